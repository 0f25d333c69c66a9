"""Qt-style signals for the stand-in widgets: ``widget.connect("clicked(bool)", slot)`` as PythonQt offers.

A slot that takes fewer arguments than the signal carries gets the first ones, as PythonQt does.
An exception raised in a slot does not reach the code that emitted the signal (Qt's event loop would
print it); it is recorded in ``SLOT_ERRORS`` so that tests can assert that none happened.
"""

from __future__ import annotations

import inspect
import traceback
from typing import Any, Callable

SLOT_ERRORS: list[BaseException] = []


def signal_name(signature: str) -> str:
    """``"clicked(bool)"`` -> ``"clicked"``."""
    return signature.split("(", 1)[0].strip()


def _call(slot: Callable[..., Any], args: tuple) -> None:
    try:
        parameters = inspect.signature(slot).parameters.values()
        if not any(p.kind is p.VAR_POSITIONAL for p in parameters):
            positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            args = args[: len(positional)]
    except (TypeError, ValueError):
        pass
    try:
        slot(*args)
    except Exception as error:  # noqa: BLE001 - Qt prints slot errors and goes on
        traceback.print_exc()
        SLOT_ERRORS.append(error)


class SignalSource:
    """Mixin: named signals with connected slots; ``emit(name, *args)`` calls them in order."""

    def __init__(self) -> None:
        self._slots: dict[str, list[Callable[..., Any]]] = {}
        self._signalsBlocked = False

    def connect(self, signature: str, slot: Callable[..., Any]) -> bool:
        self._slots.setdefault(signal_name(signature), []).append(slot)
        return True

    def disconnect(self, signature: str, slot: Callable[..., Any] = None) -> bool:
        slots = self._slots.get(signal_name(signature), [])
        if slot is None:
            slots.clear()
        elif slot in slots:
            slots.remove(slot)
        return True

    def blockSignals(self, block: bool) -> bool:
        previous, self._signalsBlocked = self._signalsBlocked, bool(block)
        return previous

    def emit(self, name: str, *args: Any) -> None:
        if self._signalsBlocked:
            return
        for slot in list(self._slots.get(signal_name(name), [])):
            _call(slot, args)

    def connections(self, name: str) -> list[Callable[..., Any]]:
        return list(self._slots.get(signal_name(name), []))
