"""cdb-vq: a Hugging Face image tokenizer whose codes are picked by a CLIP-guided Codebook Decision Block.

Importing this package registers the config, model and image processor with `AutoConfig`, `AutoModel` and
`AutoImageProcessor`, and marks them for `save_pretrained` to write their code (`auto_map`), so saved folders load
with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_cdb_vq import CDBVQConfig
from .image_processing_cdb_vq import CDBVQImageProcessor
from .modeling_cdb_vq import CDBVQEncoderOutput, CDBVQModel, CDBVQModelOutput, CDBVQPreTrainedModel
from .quantization_cdb_vq import CDBVQQuantizer, CDBVQQuantizerOutput


__version__ = "0.1.0"

AutoConfig.register(CDBVQConfig.model_type, CDBVQConfig, exist_ok=True)
AutoModel.register(CDBVQConfig, CDBVQModel, exist_ok=True)
# One class serves both backends: it needs neither torchvision nor PIL-specific code paths.
AutoImageProcessor.register(
    CDBVQConfig, image_processor_classes={"torchvision": CDBVQImageProcessor, "pil": CDBVQImageProcessor}, exist_ok=True
)
CDBVQConfig.register_for_auto_class()
CDBVQModel.register_for_auto_class("AutoModel")
CDBVQImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CDBVQConfig",
    "CDBVQEncoderOutput",
    "CDBVQImageProcessor",
    "CDBVQModel",
    "CDBVQModelOutput",
    "CDBVQPreTrainedModel",
    "CDBVQQuantizer",
    "CDBVQQuantizerOutput",
]
