"""NPT model surgery on Hugging Face Llama models."""
from .convert import convert_model, decoder_layers, np_named_parameters, npt_layers, parse_layer_spec, set_mode
from .fused import fused_forward
from .inject import Injections, context_deltas, inject
from .io import fold_context, fold_modulation, load_np_weights, save_np_weights
from .loading import ByteTokenizer, load_base_model, load_tokenizer, tiny_llama
from .np_component import ModulatedMLPInputs, Modulation, NPComponent, NPExtras, modulated_mlp
from .npt_layer import NPTDecoderLayer
from .outputs import LayerOutput, NPTForwardOutput, layer_output

__all__ = [
    "ByteTokenizer", "Injections", "LayerOutput", "ModulatedMLPInputs", "Modulation", "NPComponent", "NPExtras", "NPTDecoderLayer", "NPTForwardOutput",
    "context_deltas", "convert_model", "decoder_layers", "fold_context", "inject", "fold_modulation", "fused_forward",
    "layer_output", "load_base_model", "load_np_weights", "load_tokenizer", "modulated_mlp", "np_named_parameters",
    "npt_layers", "parse_layer_spec", "save_np_weights", "set_mode", "tiny_llama",
]
