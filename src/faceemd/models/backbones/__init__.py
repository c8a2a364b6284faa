"""The backbones of the paper, the real MobileFaceNet and a tiny CPU demo net, one module each."""

from faceemd.models.backbones.arcface_resnet import ArcFaceResNet18
from faceemd.models.backbones.base import BackboneOutput, FaceBackbone
from faceemd.models.backbones.facenet import InceptionResnetV1
from faceemd.models.backbones.mobilefacenet import MobileFaceNet
from faceemd.models.backbones.sphereface import SphereFace20
from faceemd.models.backbones.tiny import TinyFaceNet

__all__ = [
    "ArcFaceResNet18",
    "BackboneOutput",
    "FaceBackbone",
    "InceptionResnetV1",
    "MobileFaceNet",
    "SphereFace20",
    "TinyFaceNet",
]
