"""Methods mixed into vLLM's worker (`worker_extension_cls`), called by name through
`LLM.collective_rpc`: small control messages between RolloutWorker and the engine process.
"""
from __future__ import annotations


class LockstepWorkerExtension:
    def _lockstep_model(self):
        return self.model_runner.get_model()

    def lockstep_state(self) -> dict:
        """What the engine process runs: weight version, logprob temperature, kernel mode."""
        from rl import kernels as K
        model = self._lockstep_model()
        return {"weight_version": model.weight_version, "update_error": model.update_error,
                "temperature": model.temperature, "kernels": K.get_kernels()}

    def lockstep_build(self) -> dict[str, str | None]:
        """The engine's build fingerprint (rl.model.fingerprint), as a flat dict."""
        return {k: None if v is None else str(v) for k, v in self._lockstep_model().build.items()}

    def lockstep_weight_shapes(self) -> dict[str, list[int]]:
        """Every tensor an update must carry (HF names) and its shape."""
        return {name: list(t.shape) for name, t in self._lockstep_model().lm.state_dict().items()}

    def lockstep_set_temperature(self, temperature: float) -> None:
        """Temperature of the logprobs `compute_logits` returns (and so of sampling)."""
        self._lockstep_model().temperature = float(temperature)

    def lockstep_inject_fault(self, message: str) -> None:
        """Test hook: the next forward raises RuntimeError(message), killing the engine."""
        self._lockstep_model().fault = message

    def lockstep_trace(self, directory: str | None) -> None:
        """Record every forward into `directory` (rollout.engine_trace); None stops."""
        from rollout.engine_trace import EngineTrace
        self._lockstep_model().trace = None if directory is None else EngineTrace(directory)
