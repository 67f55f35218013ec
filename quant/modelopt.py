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

if TYPE_CHECKING:
    import torch


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


def calibrate_module(model: Any, module_name: str, algorithm: dict, forward_loop: Callable[[Any], None]) -> None:
    """Run the layerwise `algorithm` (GPTQ) on one quantized module outside the decoder layers, after quantize_model.

    ModelOpt's layerwise calibration visits only the decoder layers, leaving e.g. the LM head with an
    uncalibrated weight quantizer. GPTQ runs here on `module_name` alone with the preset's own settings
    (max calibration of its quantizers, Hessian of its inputs, column-wise weight update); each of its
    passes forwards the whole model, whose layers are already quantized, so the module's Hessian comes from
    quantized activations as ModelOpt's layerwise GPTQ gives each layer.
    """
    _mtq()  # imports ModelOpt quietly, or names the missing extra
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization.config import GPTQCalibConfig

    if algorithm.get("method") != "gptq":
        raise ValueError(f"calibrate_module runs GPTQ only, not {algorithm.get('method')!r}")
    settings = GPTQCalibConfig(**algorithm).model_dump()
    kwargs = {k: v for k, v in settings.items() if k not in ("method", "layerwise", "moe_calib_experts_ratio")}
    module = model.get_submodule(module_name)
    with _quiet():
        model_calib.gptq(module, lambda _module: forward_loop(model), **kwargs)


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
