"""Training-side code of cdb-vq: data, CLIP teacher, losses, evaluation, checkpoints, publishing, priors and the CLI.

The four files at the package root (`configuration_`, `modeling_`, `quantization_`, `image_processing_cdb_vq.py`)
are the Hub remote code: they import only torch, transformers and each other, and never anything from here. The
modules in this subpackage may import them (`from ..modeling_cdb_vq import CDBVQModel`), never the other way round.
Importing this subpackage imports nothing: each module is imported on its own, since most need training extras
(`pip install "cdb-tokenizer[train]"`; from a checkout, `pip install -e ".[train]"`).
"""
