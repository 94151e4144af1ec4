"""Models: a Llama-style decoder (SmolLM2 and Gemma 3 from GGUF) and a BERT encoder (MiniLM).

Example:
    >>> import jquant
    >>> m = jquant.models.from_gguf()                     # SmolLM2-135M, float32
    >>> ids = m.tokenizer.encode("The capital of France is").ids
    >>> logits = m.apply(m.params, jax.numpy.asarray([ids]))
    >>> bert = jquant.models.from_safetensors()           # all-MiniLM-L6-v2
"""

from jquant.models.layers import RMSNorm, LayerNorm
from jquant.models.llama import LlamaConfig, Model, llama_init, Transformer, Block
from jquant.models.loaders import from_gguf, gguf_tokenizer, default_gguf_path, gemma3_270m_path
from jquant.models.bert import BertConfig, BertModel, bert_init, from_safetensors

__all__ = [
    "RMSNorm", "LayerNorm", "LlamaConfig", "Model", "llama_init", "Transformer", "Block",
    "from_gguf", "gguf_tokenizer", "default_gguf_path", "gemma3_270m_path", "BertConfig", "BertModel", "bert_init",
    "from_safetensors",
]
