"""The only module that imports NVIDIA ModelOpt: calibrate a transformers model, read what it decided,
export ModelOpt's unified HF checkpoint.

ModelOpt prints to stdout and draws progress bars on stderr, warns on import, and takes ~10 s to import:
every call here runs inside `_quiet()` and the import happens on first use only. Reading the quantizers
turns ModelOpt's state into plain tensors (`LinearState`) so the rest of llmx never touches its objects.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmx.common.errors import LlmxError
from llmx.quant.export_llmx import LinearState
from llmx.quant.gptq import HessianAccumulator, gptq_quantize, stage_of

if TYPE_CHECKING:
    import torch

    from llmx.quant.gptq import GptqSettings


def modelopt_version() -> str | None:
    try:
        return importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ModelOpt's prints, progress bars and warnings, and transformers' logger, for one call."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _mtq():
    try:
        with _quiet():
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise LlmxError(f"NVIDIA ModelOpt could not be imported ({exc}); install the quantization extra: "
                        "pip install 'llmx[quant]'.") from None
    return mtq


def quantize_model(model: Any, config: dict, forward_loop: Callable[[Any], None]) -> None:
    """mtq.quantize in place: insert quantizers per `config` and calibrate them with `forward_loop`."""
    mtq = _mtq()
    with _quiet():
        mtq.quantize(model, config, forward_loop)


def gptq_layerwise(model: Any, forward_loop: Callable[[Any], None], *, group_size: int,
                   settings: "GptqSettings") -> None:
    """llmx's GPTQ (llmx.quant.gptq) on every decoder layer, after quantize_model inserted the quantizers.

    ModelOpt's layerwise pass calibrates one decoder layer at a time on inputs it caches from the layers
    before, which are already quantized (get_qdq_activations_from_prev_layer): each layer's Hessians come
    from the activations the quantized model will really produce.
    """
    _mtq()
    from modelopt.torch.quantization.model_calib import layerwise_calibrate

    def calibrate_layer(layer, layer_loop):
        gptq_module(layer, layer_loop, group_size=group_size, settings=settings)

    with _quiet():
        layerwise_calibrate(model, forward_loop, calibrate_layer, get_qdq_activations_from_prev_layer=True)


def gptq_module(module: Any, forward_loop: Callable[[Any], None], *, group_size: int,
                settings: "GptqSettings") -> None:
    """GPTQ on the quantized Linears inside `module` (a decoder layer, or one Linear such as the LM head).

    `forward_loop(module)` replays the calibration data through `module`. The Linears go stage by stage
    (llmx.quant.gptq.STAGES): one forward per stage collects the Hessians of that stage's inputs, computed
    by the already-quantized stages before it; then each weight is replaced by its GPTQ dequantized values
    and its weight quantizer's amax by the group amax GPTQ chose, so export finds GPTQ's codes again.
    """
    import torch

    _mtq()
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context
    from modelopt.torch.quantization.model_calib import max_calibrate

    with _quiet():
        max_calibrate(module, forward_loop, skip_forward_without_activation_calib=True)  # shapes every amax
    linears = [(name, m) for name, m in module.named_modules()
               if _enabled(_first_stage(getattr(m, "weight_quantizer", None)))]
    for stage in sorted({stage_of(name) for name, _ in linears}):
        members = [(name, m) for name, m in linears if stage_of(name) == stage]
        sums = {name: HessianAccumulator(m.weight.shape[1]) for name, m in members}
        hooks = [m.register_forward_pre_hook(lambda _m, args, acc=sums[name]: acc.add(args[0]))
                 for name, m in members]
        try:
            # Earlier stages already hold dequantized GPTQ weights; later ones must run unquantized.
            with _quiet(), set_quantizer_by_cfg_context(module, [{"quantizer_name": "*weight_quantizer",
                                                                  "enable": False}]):
                forward_loop(module)
        finally:
            for hook in hooks:
                hook.remove()
        for name, m in members:
            with torch.no_grad():
                dequantized, amax = gptq_quantize(m.weight.detach(), sums[name].hessian(),
                                                  group_size=group_size, settings=settings)
                m.weight.data = dequantized.to(device=m.weight.device, dtype=m.weight.dtype)
                quantizer = m.weight_quantizer
                quantizer.amax = amax.reshape(quantizer.amax.shape).to(quantizer.amax)


def quantize_inputs_per_token(model: Any, modules: list[str], num_bits: Any) -> None:
    """Make the input quantizers of `modules` quantize each token with its own amax at every forward.

    That is what llmx's engine does for int8_sq and fp8_pc_pt (kernels/quantize_act.py), where the ModelOpt
    calibration config has a static per-tensor input scale (int8_sq) or none (fp8_pc_pt). A smoothing
    vector already on a quantizer (SmoothQuant's pre_quant_scale) is kept.
    """
    _mtq()
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

    cfg = {"num_bits": num_bits, "axis": None, "type": "dynamic", "block_sizes": {-1: None}}
    with _quiet():
        set_quantizer_by_cfg(model, [{"quantizer_name": f"{name}.input_quantizer", "cfg": cfg} for name in modules])


def quantized_linear_names(model: Any) -> list[str]:
    """Names of the modules whose weight quantizer is enabled after quantize_model."""
    return [name for name, module in model.named_modules()
            if _enabled(_first_stage(getattr(module, "weight_quantizer", None)))]


def read_linear_state(module: Any) -> LinearState:
    """The calibrated state of one quantized Linear, as plain float32 CPU tensors."""
    import torch

    wq = _first_stage(module.weight_quantizer)
    iq = getattr(module, "input_quantizer", None)
    weight = module.weight.detach().float().cpu()
    weight_pqs = _tensor(getattr(wq, "pre_quant_scale", None)) if getattr(wq, "_enable_pre_quant_scale", False) else None
    if weight_pqs is not None:  # ModelOpt kept W / s unfolded: the quantizer multiplies it on the fly
        weight = weight * weight_pqs.reshape(1, -1)
    input_pqs = None
    if iq is not None and getattr(iq, "_enable_pre_quant_scale", True):
        input_pqs = _tensor(getattr(iq, "pre_quant_scale", None))
    return LinearState(
        weight=weight,
        weight_amax=_tensor(wq.amax),
        input_amax=_tensor(iq.amax) if _enabled(iq) else None,
        input_channel_amax=_tensor(getattr(iq, "_amax_for_smoothing", None)) if iq is not None else None,
        pre_quant_scale=None if input_pqs is None else input_pqs.reshape(-1).to(torch.float32),
    )


def read_kv_amax(attention: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Calibrated amax of the keys (after RoPE) and values one attention module wrote to its cache."""
    k, v = _tensor(attention.k_bmm_quantizer.amax), _tensor(attention.v_bmm_quantizer.amax)
    if k is None or v is None:
        raise LlmxError("KV-cache calibration saw no keys/values: the calibration forward did not reach "
                        "the attention layers; check --calib-data.")
    return k.reshape(()), v.reshape(())


def export_hf_checkpoint(model: Any, export_dir: str, dtype: "torch.dtype") -> None:
    """ModelOpt's unified HF export (mutates `model`: pass a copy)."""
    _mtq()
    try:
        with _quiet():
            from modelopt.torch.export import export_hf_checkpoint as export
    except ImportError as exc:
        raise LlmxError(f"NVIDIA ModelOpt's export module could not be imported ({exc}); install the "
                        "quantization extra: pip install 'llmx[quant]'.") from None
    with _quiet():
        export(model, dtype=dtype, export_dir=export_dir)


def _first_stage(quantizer: Any) -> Any:
    """W4A8's weight quantizer is a sequence (int4 groups, then fp8): the int4 stage holds the group amax."""
    import torch

    if isinstance(quantizer, torch.nn.Sequential):
        return quantizer[0]
    return quantizer


def _enabled(quantizer: Any) -> bool:
    return quantizer is not None and bool(getattr(quantizer, "is_enabled", False))


def _tensor(value: Any) -> "torch.Tensor | None":
    import torch

    if not isinstance(value, torch.Tensor):
        return None
    return value.detach().float().cpu()
