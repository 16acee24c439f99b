"""Small models and the parameter-dict / flat-vector helpers the algorithms work with.

Models are plain `nn.Module`s used as *architectures*: their weights travel as a flat float32
vector (the wire format between driver, workers and aggregator) and are trained as dicts of
tensors with `torch.func.functional_call`, so one module instance serves any number of clients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmeta.sim.config import ConfigError, ModelConfig

Params = dict[str, torch.Tensor]


def mlp(in_features: int, hidden: list[int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, ...],
    channels: list[int],
    kernel_size: int,
    padding: int,
    hidden: int,
    num_classes: int,
) -> nn.Module:
    """Conv(k)-ReLU-MaxPool2 blocks, then Linear-ReLU-Linear (the FEMNIST CNN of LEAF for 28x28).

    Built as Conv-MaxPool-ReLU: ReLU and max-pooling commute (both monotone), so the function is
    the same, and the ReLU (and its backward) runs on a 4x smaller tensor."""
    in_ch, h, w = input_shape
    layers: list[nn.Module] = []
    for out_ch in channels:
        layers += [nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding), nn.MaxPool2d(2), nn.ReLU()]
        h = (h + 2 * padding - kernel_size + 1) // 2
        w = (w + 2 * padding - kernel_size + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"model.channels: {len(channels)} conv blocks with kernel {kernel_size} and padding {padding} "
                f"shrink a {input_shape[1]}x{input_shape[2]} input to nothing; use fewer blocks or more padding"
            )
        in_ch = out_ch
    layers += [nn.Flatten(), nn.Linear(in_ch * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def custom(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The researcher's `factory(input_shape, num_classes, **kwargs)`, checked: an nn.Module whose
    state is all parameters. Buffers (e.g. BatchNorm's running statistics) would be neither
    averaged nor sent by the clients, so they are refused rather than silently wrong."""
    from fedmeta.sim.artifacts.usercode import import_target

    factory = import_target(cfg.target, "model.target")
    try:
        model = factory(tuple(input_shape), num_classes, **cfg.kwargs)
    except Exception as e:  # the user's code: any failure is a config problem to report in one line
        raise ConfigError(
            f"model.target: {cfg.target}(input_shape={tuple(input_shape)}, num_classes={num_classes}, "
            f"**{cfg.kwargs}) failed: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.target: {cfg.target} returned {type(model).__name__}, not a torch.nn.Module"
        )
    buffers = [k for k, _ in model.named_buffers()]
    if buffers:
        raise ConfigError(
            f"model.target: the module has buffers ({', '.join(buffers[:3])}), e.g. BatchNorm running "
            "statistics, which federated averaging does not carry; use LayerNorm or GroupNorm"
        )
    if num_params(model) == 0:
        raise ConfigError(f"model.target: {cfg.target} has no parameters to train")
    return model


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.kind == "custom":
        return custom(cfg, input_shape, num_classes)
    if cfg.kind == "mlp":
        return mlp(math.prod(input_shape), list(cfg.hidden), num_classes)
    if len(input_shape) == 2:  # (h, w) -> one channel
        input_shape = (1, *input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"model.kind: 'cnn' needs image inputs (channels, h, w), got shape {input_shape}")
    return cnn(input_shape, list(cfg.channels), cfg.kernel_size, cfg.padding, cfg.cnn_hidden, num_classes)


NORMS = (nn.LayerNorm, nn.GroupNorm)


def init_params(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """A seeded initialisation (PyTorch's default scheme, drawn from `gen`) as a flat vector, in
    `named_parameters` order: Linear/Conv weights and biases uniform in +-1/sqrt(fan_in) (what
    kaiming_uniform(a=sqrt(5)) gives), norm layers' scale 1 and shift 0, embeddings N(0, 1); any
    other parameter uniform in +-1/sqrt(its last dimension)."""
    out = []
    for m in model.modules():
        own = dict(m.named_parameters(recurse=False))
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            bound = 1.0 / math.sqrt(m.weight[0].numel())
            out += [(torch.rand(p.shape, generator=gen) * 2 - 1).mul_(bound).flatten() for p in own.values()]
        elif isinstance(m, NORMS):
            out += [(torch.ones if k == "weight" else torch.zeros)(p.shape).flatten() for k, p in own.items()]
        elif isinstance(m, nn.Embedding):
            out += [torch.randn(p.shape, generator=gen).flatten() for p in own.values()]
        else:
            out += [
                (torch.rand(p.shape, generator=gen) * 2 - 1)
                .div_(math.sqrt(p.shape[-1] if p.dim() else 1))
                .flatten()
                for p in own.values()
            ]
    flat = torch.cat(out)
    assert flat.numel() == num_params(model)
    return flat


@torch.no_grad()
def inference_ms(
    model: nn.Module, flat: torch.Tensor, input_shape: tuple[int, ...], batch: int = 64, repeats: int = 21
) -> float:
    """Median wall time (ms) of one forward pass of `model` with parameters `flat` on a batch of
    `batch` inputs, on one CPU thread (what a serving replica of one CPU gets); the first call is
    a warm-up. The inputs are zeros: the models here have no data-dependent control flow."""
    import time

    params = unflatten(flat.detach().float(), param_shapes(model))
    x = torch.zeros(batch, *input_shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.func.functional_call(model, params, (x,))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.func.functional_call(model, params, (x,))
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return float(sorted(times)[len(times) // 2] * 1e3)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: p.shape for k, p in model.named_parameters()}


def unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> Params:
    """Flat (..., n_params) -> {name: (..., *shape)} views; leading batch dims are kept."""
    out, i = {}, 0
    lead = flat.shape[:-1]
    for k, s in shapes.items():
        n = math.prod(s)
        out[k] = flat[..., i : i + n].reshape(*lead, *s)
        i += n
    return out


def flatten(params: Params, batch_dims: int = 0) -> torch.Tensor:
    """{name: (*batch, *shape)} -> (*batch, n_params), in dict order."""
    parts = [p.reshape(*p.shape[:batch_dims], -1) for p in params.values()]
    return torch.cat(parts, dim=-1)
