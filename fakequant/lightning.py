"""``FakeQuantCallback``: fake-quantized training for any LightningModule, with the numerics monitor.

Three lines in an existing Lightning script::

    from fakequant.lightning import FakeQuantCallback
    trainer = L.Trainer(..., callbacks=[FakeQuantCallback("mxfp8")])
    trainer.fit(model)

What it does, hook by hook (the shape of Lightning's ``ModelPruning``):

* ``__init__`` validates every argument; a bad one raises ``ValueError``/``TypeError`` naming it and listing
  what is allowed (the recipe names, ...). Nothing touches the model yet.
* ``setup`` patches the LightningModule once (``fakequant.patch``: every selected ``nn.Linear`` changes class in
  place; ``forward`` is never wrapped), before the optimizers are configured, with the monitor, the saver
  (if given) and the config's own ``observers`` (``FakeQuantConfig.observers``) as observers. Functional
  matmul/SDPA calls are not patched here: call them inside ``fakequant.patch_functional`` in the module's
  own code.
* Quantization is off (plain GEMMs, bit for bit) while ``trainer.global_step < start_step`` (a
  high-precision warm-up) and on from ``start_step``; validation runs in whichever state training is in.
* Every ``monitor_every_n_steps`` steps the monitor's statistics go to the Lightning loggers on rank zero
  under ``fakequant/<layer>/<gemm>.<role>/<stat>`` (``fakequant.monitor``). The first NaN/inf in a patched
  GEMM is reported (``warnings.warn``, on the rank that saw it) with layer, GEMM, role and step, kept in
  ``first_nonfinite``, and with ``stop_on_nonfinite=True`` training stops cleanly after that step
  (``trainer.should_stop``; every rank stops).
* ``state_dict`` holds the formats and ``start_step``: a run resumed from a checkpoint is quantized as the
  checkpoint says, even if the callback was built with another recipe (with a warning).
* ``teardown`` unpatches the module.

Public: ``FakeQuantCallback``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from .config import FORMAT_FIELDS, FakeQuantConfig, recipe_names
from .monitor import NonFinite, NumericsMonitor
from .patch import FakeQuantLinear, is_enabled, patch, set_enabled, unpatch

__all__ = ["FakeQuantCallback"]


def _resolve_config(config_or_recipe: Any) -> FakeQuantConfig:
    if isinstance(config_or_recipe, FakeQuantConfig):
        return config_or_recipe
    if isinstance(config_or_recipe, dict):
        return FakeQuantConfig.from_dict(config_or_recipe)
    if isinstance(config_or_recipe, (str, Path)):
        try:
            return FakeQuantConfig.from_recipe(config_or_recipe)
        except ValueError as err:
            raise ValueError(f"FakeQuantCallback: config_or_recipe: {err}") from None
    raise TypeError(
        f"FakeQuantCallback: config_or_recipe must be a FakeQuantConfig, a recipe name "
        f"({', '.join(recipe_names())}), a .yaml path or a dict, got {type(config_or_recipe).__name__}"
    )


def _check_int(name: str, value: Any, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"FakeQuantCallback: {name}={value!r} is not allowed; {name} must be {allowed}")
    return value


class FakeQuantCallback(Callback):
    """Fake-quantize a LightningModule's linear GEMMs during training (see the module docstring).

    Args:
        config_or_recipe: a ``FakeQuantConfig``, a recipe name (``"mxfp8"``, ...), a recipe ``.yaml`` path, or
            a dict of ``FakeQuantConfig`` fields.
        start_step: the optimizer step from which quantization is on (0 = from the start).
        module_filter: which ``nn.Linear`` modules to patch, by fully-qualified name: a regex, a callable
            ``(name, module) -> bool``, or a list of them (replaces the config's ``include``); ``None`` keeps
            the config's selection.
        monitor_every_n_steps: log the numerics monitor's statistics every N steps; ``None`` for none (the
            NaN/inf check still runs).
        stop_on_nonfinite: stop training after the step in which a patched GEMM first sees a NaN/inf.
        saver: an observer (e.g. ``fakequant.saver.TensorSaver``) attached with the monitor; its ``step(n)``
            is called at each training step and its ``close()`` at teardown, when it has them. Observers in
            the config (``FakeQuantConfig.observers``) are attached too and stepped and closed alike, so a
            saver can come with the config instead.
        verbose: print the patch report (rank zero).
    """

    def __init__(
        self,
        config_or_recipe: FakeQuantConfig | str | Path | dict,
        start_step: int = 0,
        module_filter: Any = None,
        monitor_every_n_steps: int | None = 50,
        stop_on_nonfinite: bool = False,
        saver: Any = None,
        verbose: bool = True,
    ) -> None:
        config = _resolve_config(config_or_recipe)
        self.start_step = _check_int("start_step", start_step, 0, "an int >= 0 (the first quantized step)")
        if module_filter is not None:
            try:
                config = config.replace(include=module_filter)
            except (ValueError, TypeError) as err:
                raise type(err)(
                    f"FakeQuantCallback: module_filter={module_filter!r} is not allowed; it must be a regex, a "
                    f"callable (name, module) -> bool, a list of them, or None ({err})"
                ) from None
        self.config = config
        if monitor_every_n_steps is not None:
            _check_int("monitor_every_n_steps", monitor_every_n_steps, 1, "a positive int or None (no monitor)")
        self.monitor_every_n_steps = monitor_every_n_steps
        for name, value in (("stop_on_nonfinite", stop_on_nonfinite), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise TypeError(f"FakeQuantCallback: {name} must be True or False, got {value!r}")
        self.stop_on_nonfinite = stop_on_nonfinite
        self.verbose = verbose
        if saver is not None and not callable(saver):
            raise TypeError(
                f"FakeQuantCallback: saver must be None or an observer, a callable (OperandEvent) -> None "
                f"(e.g. fakequant.saver.TensorSaver), got {type(saver).__name__}"
            )
        self.saver = saver
        self.monitor = NumericsMonitor(monitor_every_n_steps)
        self.report = None  # the PatchReport of setup
        self.first_nonfinite: NonFinite | None = None
        self._module: pl.LightningModule | None = None
        self._warned = False

    # ------------------------------------------------------------------------------------------- patching
    @property
    def patched(self) -> bool:
        return self._module is not None

    def _observers(self) -> list:
        return [self.monitor] + ([self.saver] if self.saver is not None else [])

    def _stepped(self) -> list:
        """The saver and the config's observers, each once: the ones told the step and closed (the monitor
        has its own calls)."""
        out: list = []
        for obs in ([self.saver] if self.saver is not None else []) + list(self.config.observers):
            if obs is not self.monitor and all(obs is not o for o in out):
                out.append(obs)
        return out

    def _close_observers(self) -> None:
        for obs in self._stepped():
            close = getattr(obs, "close", None)  # TensorSaver: no dumps until the next step(n)
            if callable(close):
                close()

    def _patch(self, pl_module: pl.LightningModule) -> None:
        already = [n for n, m in pl_module.named_modules() if isinstance(m, FakeQuantLinear)]
        if already:
            raise RuntimeError(
                f"FakeQuantCallback: the LightningModule is already patched ({already[0]!r}, ...): use either "
                f"fakequant.patch or the callback, not both"
            )
        self.report = patch(pl_module, self.config, observers=self._observers())
        if not len(self.report):
            warnings.warn(
                "FakeQuantCallback: no nn.Linear module was selected, nothing is fake-quantized "
                f"(skipped: {[n for n, _ in self.report.skipped]})"
            )
        self._module = pl_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._module is pl_module:
            return  # patched once, for fit and any later validate/test on the same module
        self._patch(pl_module)
        if not trainer.is_global_zero:
            self.monitor.every_n_steps = None  # statistics are logged on rank zero only; NaN checks everywhere
        if self.verbose:
            rank_zero_info(str(self.report))
        self._set_quantization(trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._module is not None and self._module is pl_module:
            if len(self.report):
                unpatch(pl_module)
            self._module = None
            self._close_observers()

    def _set_quantization(self, step: int) -> None:
        if self._module is None or not len(self.report):
            return
        want = step >= self.start_step
        first = next(m for m in self._module.modules() if isinstance(m, FakeQuantLinear))
        if is_enabled(first) != want:
            set_enabled(self._module, want)

    @property
    def quantizing(self) -> bool:
        """Whether the patched module fake-quantizes now (False before ``start_step`` and when unpatched)."""
        if self._module is None or not len(self.report):
            return False
        return is_enabled(next(m for m in self._module.modules() if isinstance(m, FakeQuantLinear)))

    # ---------------------------------------------------------------------------------------- training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_quantization(trainer.global_step)  # after a checkpoint restored global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        self._set_quantization(step)
        self.monitor.step(step)
        for obs in self._stepped():
            step_fn = getattr(obs, "step", None)
            if callable(step_fn):
                step_fn(step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics = self.monitor.collect()
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=self.monitor.current_step)
        found = self.monitor.first_nonfinite
        if found is not None and not self._warned:
            self._warned = True
            self.first_nonfinite = found
            rank = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
            warnings.warn(found.message + rank + ("; stopping training" if self.stop_on_nonfinite else ""))
        if self.stop_on_nonfinite:
            # Every rank decides together, so that no rank waits in a collective another has left.
            if trainer.strategy.reduce_boolean_decision(found is not None, all=False):
                trainer.should_stop = True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.active = False  # the monitor and the saver describe training steps
        self._close_observers()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.active = True

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        formats = self.config.to_dict()
        return {
            "formats": {name: formats[name] for name in FORMAT_FIELDS},
            "fidelity": self.config.fidelity,
            "start_step": self.start_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = dict(state_dict["formats"], fidelity=state_dict["fidelity"])
        current = {k: v for k, v in self.config.to_dict().items() if k in saved}
        if saved != current:
            changed = ", ".join(f"{k}: {current[k]} -> {saved[k]}" for k in saved if saved[k] != current[k])
            warnings.warn(f"FakeQuantCallback: resuming with the checkpoint's formats ({changed})")
            self.config = self.config.replace(**saved)
            if self._module is not None:  # restored after setup: patch again with the checkpoint's formats
                module = self._module
                if len(self.report):
                    unpatch(module)
                self._module = None
                self._patch(module)
        self.start_step = int(state_dict["start_step"])
