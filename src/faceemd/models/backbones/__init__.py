"""The backbones of the paper, the real MobileFaceNet and SFace, a tiny CPU demo net, and two
wrappers for a user's own model (any ONNX file, any ``nn.Module``), one module each."""

from faceemd.models.backbones.arcface_resnet import ArcFaceResNet18
from faceemd.models.backbones.base import BackboneOutput, FaceBackbone
from faceemd.models.backbones.facenet import InceptionResnetV1
from faceemd.models.backbones.mobilefacenet import MobileFaceNet
from faceemd.models.backbones.onnx_model import OnnxBackbone, SFace
from faceemd.models.backbones.sphereface import SphereFace20
from faceemd.models.backbones.tiny import TinyFaceNet
from faceemd.models.backbones.torch_module import TorchBackbone

__all__ = [
    "ArcFaceResNet18",
    "BackboneOutput",
    "FaceBackbone",
    "InceptionResnetV1",
    "MobileFaceNet",
    "OnnxBackbone",
    "SFace",
    "SphereFace20",
    "TinyFaceNet",
    "TorchBackbone",
]
