"""Face image sets, occluded-query generators and the identification datamodule."""
