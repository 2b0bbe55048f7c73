"""What every segmentation model here shares: pad to the network's stride, crop back."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PadToStride", "ChannelsLast", "Compiled", "conv_bn_relu"]


class PadToStride(nn.Module):
    """Wrap a network so any input size works: pad H and W up to a multiple of ``stride``
    (reflection, so borders look like image content; replication where a side is too short to
    reflect, the pad reaching its length), run, crop the logits back. An exported graph pads the
    same way at every size (:func:`_exportable_pad`).

    Also turns torchvision's ``{"out": logits}`` into plain logits.
    """

    def __init__(self, net: nn.Module, stride: int):
        super().__init__()
        self.net, self.stride = net, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if torch.compiler.is_exporting():  # a graph for any size: pad always (by 0 where none is needed)
            x = _exportable_pad(x, ph, pw)
        elif ph or pw:
            # reflection needs a pad shorter than the side; below that (inputs under ~stride/2) replicate
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.net(x)
        if isinstance(out, dict):
            out = out["out"]
        return out[..., :h, :w]


def _exportable_pad(x: torch.Tensor, ph, pw) -> torch.Tensor:
    """The eager padding of :class:`PadToStride` (bottom/right, reflect where ``ph < h`` and
    ``pw < w``, else replicate) as gathers of the added strips, so that one exported graph
    chooses between them at run time: an ONNX reflect Pad fails in ONNX Runtime where the pad
    reaches the side, and the choice would otherwise be baked in at the size traced."""
    h, w = x.shape[-2:]
    # indices of the last row/column and the pad after it; reflected about that last one they are
    # 2(n-1) - i, negative where the pad >= n (never empty: the last row itself is in)
    iy = torch.arange(h - 1, h + ph, device=x.device)
    ix = torch.arange(w - 1, w + pw, device=x.device)
    ry, rx = 2 * (h - 1) - iy, 2 * (w - 1) - ix
    reflect = (ry.min() >= 0) & (rx.min() >= 0)  # a 0-d tensor: decided by the graph, not baked in at export
    iy = torch.where(reflect, ry, iy.clamp(max=h - 1))[1:]
    ix = torch.where(reflect, rx, ix.clamp(max=w - 1))[1:]
    # gather only the strips added, then concatenate: as fast as an ONNX Pad (1.9 vs 1.6 ms at
    # 1500x1000, ONNX Runtime on 2 cores), where one gather over the whole image took 45 ms
    right = x.index_select(3, ix)
    bottom, corner = x.index_select(2, iy), right.index_select(2, iy)
    return torch.cat([torch.cat([x, right], 3), torch.cat([bottom, corner], 3)], 2)


class ChannelsLast(nn.Module):
    """Run a model with channels_last weights and inputs (N×H×W×C in memory): faster convolutions
    on the CPU (oneDNN; measured in benchmarks/bench_engines.py) and with bf16 on GPUs. Logits
    come back in the usual layout. Used for inference (predict.py); training keeps the plain layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.contiguous(memory_format=torch.channels_last))
        if isinstance(out, dict):
            out = out["out"]
        return out.contiguous()


class Compiled(nn.Module):
    """A model whose forward runs through ``torch.compile`` (training: ``run_experiment.py --compile``),
    falling back to the plain model, with one message, where compiling fails (e.g. no C++ compiler
    for the CPU backend, or an unsupported platform). ``state_dict`` keys are those of the plain
    model under ``model.``; checkpoints hold the plain model (``distributed.unwrap`` peels this off)."""

    def __init__(self, model: nn.Module, **options):
        super().__init__()
        self.model = model
        self.__dict__["_compiled"] = torch.compile(model, **options)  # not a submodule: one set of weights
        self.failed: str | None = None

    @property
    def plain_model(self) -> nn.Module:
        """The model without compiling (``distributed.unwrap`` returns it)."""
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._compiled(x)
            except _compile_errors() as e:  # compilers fail in many ways; the plain model still trains
                if _out_of_memory(e):  # compiling ran out of memory: so would the step, say so as it is
                    raise
                self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                print(f"torch.compile failed ({self.failed[:300]}); training continues without compiling")
        return self.model(x)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when compiling fails: dynamo's errors (inductor's backend
    failures among them) and inductor's own (no C++ compiler, a failed compile, a lowering).
    Errors of the step itself (out of memory, a bug in forward, Ctrl-C) are not among them."""
    import torch._dynamo.exc as dynamo_exc

    errors = [dynamo_exc.TorchDynamoException]
    try:
        import torch._inductor.exc as inductor_exc
    except ImportError:  # a torch built without inductor
        return tuple(errors)
    for name in ("CppCompileError", "InvalidCxxCompiler", "OperatorIssue", "CppWrapperCodegenError",
                 "SubgraphLoweringException"):
        if isinstance(getattr(inductor_exc, name, None), type):
            errors.append(getattr(inductor_exc, name))
    return tuple(errors)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is, or wraps, an out-of-memory error."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3×3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
