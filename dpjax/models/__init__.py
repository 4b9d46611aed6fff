"""Flax models: torchvision-compatible ResNets and ScatterNets (fixed scattering features)."""

from dpjax.models.resnet import ARCHITECTURES
from dpjax.models.resnet import BATCH_NORM
from dpjax.models.resnet import create_model
from dpjax.models.resnet import DP_SAFE_NORMS
from dpjax.models.resnet import FROZEN_BN
from dpjax.models.resnet import GROUP_NORM
from dpjax.models.resnet import is_dp_safe
from dpjax.models.resnet import merge_params
from dpjax.models.resnet import NORMS
from dpjax.models.resnet import ResNet
from dpjax.models.resnet import ResNet18
from dpjax.models.resnet import ResNet8
from dpjax.models.resnet import ResNetTiny
from dpjax.models.resnet import SCATTERNET_ARCHITECTURES
from dpjax.models.resnet import split_params
from dpjax.models.resnet import TRAINABLE
from dpjax.models.resnet import trainable_modules
from dpjax.models.scatternet import num_scattering_channels
from dpjax.models.scatternet import ScatterNet
from dpjax.models.scatternet import ScatterNetCNN
from dpjax.models.scatternet import ScatterNetLinear
from dpjax.models.scatternet import scattering
from dpjax.models.scatternet import scattering_features

__all__ = [
    'ARCHITECTURES',
    'BATCH_NORM',
    'create_model',
    'DP_SAFE_NORMS',
    'FROZEN_BN',
    'GROUP_NORM',
    'is_dp_safe',
    'merge_params',
    'NORMS',
    'num_scattering_channels',
    'ResNet',
    'ResNet18',
    'ResNet8',
    'ResNetTiny',
    'SCATTERNET_ARCHITECTURES',
    'scattering',
    'scattering_features',
    'ScatterNet',
    'ScatterNetCNN',
    'ScatterNetLinear',
    'split_params',
    'TRAINABLE',
    'trainable_modules',
]
