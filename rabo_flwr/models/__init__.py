"""Prunable models. Each declares a :class:`~rabo_flwr.submodel.Layout` of channel groups.

Models are plain ``nn.Module``s run through :class:`~rabo_flwr.tasks.base.FunctionalModule`
(``torch.func.functional_call``'s job) with the client's sliced tensors, so one architecture
serves every width: a template on the ``meta`` device costs no memory and the narrow tensors
decide the compute.
"""

from .conv4 import Conv4
from .heads import LinearHead, MLPHead, build_head
from .layout import ModuleLayout
from .resnet12 import ResNet12
from .classifier import Classifier
from .resnet18 import ResNet18

__all__ = ["Classifier", "Conv4", "LinearHead", "MLPHead", "ModuleLayout", "ResNet12", "ResNet18", "build_head"]
