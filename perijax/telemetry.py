"""Stability telemetry in one place: what the forward pass measures of the residual stream
(`stream_stats`, sown by each block's `StreamProbe` and arranged per sublayer by
`stream_by_sublayer`), the per-layer gradient, update and norm-scale metrics a log step adds
(`layer_metrics`), and the spike counters every step keeps (`Spikes`, `count_spikes`). The
definitions are docs/telemetry.md's; the divergence guard uses the same spike test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from perijax import checkpoint as checkpoint_lib
from perijax.norms import NORM_ROLES, norm_name

FP16_MAX = 65504.0
E4M3_MAX = 448.0  # float8 e4m3fn's largest finite value


def global_norm(tree) -> jax.Array:
    """L2 norm over every leaf of a pytree, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def stream_stats(stream: jax.Array, added: jax.Array) -> dict[str, jax.Array]:
    """Scalar float32 telemetry of the residual stream after a sublayer and of what the
    sublayer added: per-token variance over d_model (averaged), RMS, max |h| (the amax), the
    fractions of entries beyond the float16 and the float8 e4m3 maximum (what would saturate
    without scaling), and the RMS of the added tensor."""
    h = stream.astype(jnp.float32)
    a = added.astype(jnp.float32)
    centered = h - jnp.mean(h, axis=-1, keepdims=True)
    return {
        "resid_var": jnp.mean(jnp.square(centered)),
        "resid_rms": jnp.sqrt(jnp.mean(jnp.square(h))),
        "max_abs": jnp.max(jnp.abs(h)),
        "frac_over_fp16": jnp.mean((jnp.abs(h) > FP16_MAX).astype(jnp.float32)),
        "frac_over_e4m3": jnp.mean((jnp.abs(h) > E4M3_MAX).astype(jnp.float32)),
        "sublayer_rms": jnp.sqrt(jnp.mean(jnp.square(a))),
    }


class StreamProbe(nnx.Module):
    """Sows `stream_stats` of the stream after one sublayer and of what the sublayer added, as
    the `nnx.Intermediate` "stats" (the block's layer loop captures it with `nnx.capture`). No
    parameters: it changes no parameter path."""

    def __call__(self, stream: jax.Array, added: jax.Array) -> None:
        stats = stream_stats(stream, added)
        self.sow(nnx.Intermediate, "stats", stats, init_fn=lambda: None, reduce_fn=_latest)


def _latest(_, value):
    return value


def stream_by_sublayer(sown: Any) -> dict[str, dict[str, jax.Array]]:
    """The statistics the StreamProbes of [L]-stacked blocks sowed (the `nnx.Intermediate`
    State the layer loop captured), as {"attn": {name: [L]}, "mlp": {name: [L]}}."""
    return {sub: sown[f"{sub}_stream"]["stats"].get_value() for sub in ("attn", "mlp")}


@dataclasses.dataclass(frozen=True)
class Spikes:
    """Static spike definitions (docs/telemetry.md): the `telemetry.*` keys of these names
    (`config.from_section(Spikes, cfg.telemetry)`). The counters and, with
    `train.skip_loss_spikes`, the divergence guard use the same one."""

    grad_spike_factor: float
    loss_spike_factor: float
    spike_window: int
    spike_min_history: int


def count_spikes(state: Any, loss: jax.Array, grad_norm: jax.Array) -> dict:
    """Spike counters of `state` (a perijax.step.TrainState), updated every step: a value above
    factor x the running median of the last `spike_window` finite values (counted once
    `spike_min_history` values exist). Every finite step enters the history, applied or not, so
    a lasting change of level stops counting as spikes."""
    sp = state.spikes
    ready = state.history_count >= sp.spike_min_history
    grad_spike = ready & (grad_norm > sp.grad_spike_factor * jnp.nanmedian(state.grad_history))
    loss_spike = ready & (loss > sp.loss_spike_factor * jnp.nanmedian(state.loss_history))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    pos = state.history_count % sp.spike_window
    keep = lambda hist, v: jnp.where(finite, hist.at[pos].set(v), hist)  # noqa: E731
    return {
        "grad_history": keep(state.grad_history, grad_norm.astype(jnp.float32)),
        "loss_history": keep(state.loss_history, loss.astype(jnp.float32)),
        "history_count": state.history_count + finite,
        "grad_spikes": state.grad_spikes + grad_spike,
        "loss_spikes": state.loss_spikes + loss_spike,
    }


def _per_layer_norms(blocks: Any, scanned: bool, num_layers: int) -> jax.Array:
    """[L] L2 norms of each layer's part of a params-shaped tree."""
    if scanned:
        leaves = jax.tree.leaves(blocks)
        sq = sum(
            jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim))) for x in leaves
        )
        return jnp.sqrt(sq)
    return jnp.stack([global_norm(blocks[i]) for i in range(num_layers)])


def _group(path: str) -> str:
    if "norm" in path:
        return "norm"
    for group in ("attn", "mlp", "embed", "lm_head"):
        if group in path.split("."):
            return "head" if group == "lm_head" else group
    return "other"


def layer_metrics(state: Any, grads: Any, params: Any, stats: dict) -> dict[str, jax.Array]:
    """Per-layer stability metrics (docs/telemetry.md) of the step from `state` (a
    perijax.step.TrainState) to `params`. Keys holding "{}" are [L] arrays that the
    host expands to one metric per layer (`stability/resid_var/07/attn`)."""
    model_cfg = nnx.merge(state.graphdef, state.params).cfg
    scanned, num_layers = model_cfg.scan_layers, model_cfg.num_layers
    out: dict[str, jax.Array] = {}
    for sub, values in stats.items():
        for name, value in values.items():
            out[f"stability/{name}/{{}}/{sub}"] = value
    out["stability/max_abs"] = jnp.max(jnp.stack([v["max_abs"].max() for v in stats.values()]))
    out["stability/grad_norm/{}"] = _per_layer_norms(grads["blocks"], scanned, num_layers)
    old_norm = _per_layer_norms(state.params["blocks"], scanned, num_layers)
    delta = jax.tree.map(jnp.subtract, params["blocks"], state.params["blocks"])
    out["stability/update_ratio/{}"] = _per_layer_norms(delta, scanned, num_layers) / old_norm
    groups: dict[str, list] = {}
    for key, leaf in checkpoint_lib.flatten(grads).items():
        groups.setdefault(_group(key), []).append(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
    for group, squares in groups.items():
        out[f"stability/grad_norm_group/{group}"] = jnp.sqrt(sum(squares))
    if model_cfg.learnable_norm_scale:
        for sub in ("attn", "mlp"):
            for role in NORM_ROLES[model_cfg.ln_placement]:
                key = norm_name(sub, role)
                if scanned:
                    gamma = jnp.mean(params["blocks"][key]["scale"][...], axis=1)
                else:
                    gamma = jnp.stack(
                        [
                            jnp.mean(params["blocks"][i][key]["scale"][...])
                            for i in range(num_layers)
                        ]
                    )
                out[f"stability/gamma/{{}}/{sub}_{role}"] = gamma
    return out
