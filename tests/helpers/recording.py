"""The real tinker ServiceClient, with training clients that record what they are asked to do.

Not a mock: every call goes to the real client (and the real server); the wrapper only keeps a copy of the data
each training step was given and of the Adam parameters of each optimizer step, for a test to assert on.
"""

from __future__ import annotations

from typing import Any


class RecordingService:
    """`create_lora_training_client` returns a future of a client that records `trained_tokens` (each datum's
    token ids, per `forward_backward_custom`) and `adam_params` (per `optim_step`); all else passes through."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.trained_tokens: list[tuple[int, ...]] = []
        self.adam_params: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_lora_training_client(self, *args: Any, **kwargs: Any) -> Any:
        service, inner = self, self._inner.create_lora_training_client(*args, **kwargs).result()

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def forward_backward_custom(self, data: Any, loss_fn: Any) -> Any:
                service.trained_tokens += [tuple(d.model_input.to_ints()) for d in data]
                return inner.forward_backward_custom(data, loss_fn)

            def optim_step(self, adam_params: Any) -> Any:
                service.adam_params.append(adam_params)
                return inner.optim_step(adam_params)

        return type("Future", (), {"result": lambda _self: Recording()})()
