"""The sandbox templates render in: Jinja's immutable sandbox, with bounds.

A template is code the recipe's author wrote, run on data nobody read: it
must not be able to take the machine's memory or a worker forever, nor
reach outside the sandbox (Jinja's own ``ImmutableSandboxedEnvironment`` sees
to that: no attribute starting with ``_``, no mutation of the row's values).
The bounds, per rendering (one row under one template):

- no text or value over :data:`MAX_OUTPUT_CHARS` characters or items, checked
  before the single operations that would allocate it (``'a' * 10**9``,
  ``'x'.ljust(N)``, ``'%0Nd' % 1``, ``'{:>N}'.format(1)``, ``x | center(N)``,
  a ``namespace()`` value grown in a loop) and on the output as it is joined;
- no more than :data:`MAX_RENDER_SECONDS` of wall time (:class:`render_bounds`);
- ``range`` is capped by Jinja's sandbox (100,000 items).

>>> env = BoundedSandbox()
>>> env.from_string("{{ 'ab' * 3 }}").render()
'ababab'
>>> try:
...     env.from_string("{{ 'ab' * 10**9 }}").render()
... except RenderLimit as exc:
...     print(exc)
a value of 2,000,000,000 characters or items is larger than a template may make (10,000,000)
"""

from __future__ import annotations

import functools
import itertools
import re
import signal
import threading
import time
from typing import Iterable

from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

# Bounds on one rendering (one row under one template). A template is code the
# recipe's author wrote, run on data nobody read: it must not be able to take
# the machine's memory or a worker forever. Far above any real document (a
# packed row holds seq_len tokens), far below what hurts.
MAX_OUTPUT_CHARS = 10_000_000  # characters of one rendered text, and of any value made while rendering
MAX_RENDER_SECONDS = 10.0  # wall time of one rendering


class RenderLimit(Exception):
    """A template went past :data:`MAX_OUTPUT_CHARS` (or, as :class:`OutOfTime`, :data:`MAX_RENDER_SECONDS`)."""


class OutOfTime(BaseException):
    """A rendering ran past :data:`MAX_RENDER_SECONDS`.

    A ``BaseException``, so that no ``except Exception`` on the way (in Jinja
    or in a filter) swallows it and lets the template run on.
    """


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus bounds on the size of what a template makes and on its time.

    Rendering is pure Python between these hooks, so the time limit is also
    enforced by a timer (see :class:`render_bounds`); the hooks
    catch, before they run, the single operations that would allocate too
    much at once (``'a' * 10**9``, ``'x'.ljust(10**9)``, ``'%0999999999d' % 1``).
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.globals["namespace"] = _BoundedNamespace
        self.bound_filters()

    def bound_filters(self) -> None:
        """Check the filters that can outgrow their input (call again after adding filters)."""
        for name in _GROWING_FILTERS:
            if name in self.filters and not getattr(self.filters[name], "_bounded", False):
                self.filters[name] = _checked_filter(self.filters[name])

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "*" and isinstance(right, int) and hasattr(left, "__len__"):
            _check_size(len(left) * right)
        elif operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
            _check_size(len(right) * left)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * abs(left).bit_length() > _MAX_POWER_BITS:
                raise RenderLimit(f"`{left} ** {right}` is too large a number")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,))
        result = super().call_binop(context, operator, left, right)
        if hasattr(result, "__len__"):
            _check_size(len(result))
        return result

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)  # the sandbox's own `str.format`, refusing private fields
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args, **kwargs):
            _check_format(fmt, (*args, *kwargs.values()))
            return wrapped(*args, **kwargs)

        return checked

    def call(self, context, obj, /, *args, **kwargs):
        _check_time()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(obj, "__name__", "")
            width = max([a for a in args if isinstance(a, int)] + [0])
            if name == "expandtabs":
                _check_size(width * owner.count("\t") + len(owner))
            elif name in _PADDING_METHODS:
                _check_size(width + len(owner))
        if obj is self.globals.get("lipsum"):
            _check_size(int(kwargs.get("n", args[0] if args else 5)) * 1000)
        for value in (*args, *kwargs.values()):
            if isinstance(value, str):
                _check_size(len(value))
        return super().call(context, obj, *args, **kwargs)


class _BoundedNamespace(Namespace):
    """``namespace()``: the one object a template can assign to, so the one place a loop can grow a value."""

    def __setitem__(self, name: str, value) -> None:
        if hasattr(value, "__len__"):
            _check_size(len(value))
        super().__setitem__(name, value)


_MAX_POWER_BITS = 1_000_000
_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill"})
_NESTED_FIELD = re.compile(r"\{[^{}]*:[^{}]*\{")  # a format spec that takes a value from the arguments
_WIDTHS = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?|\{[^{}]*?:[^{}]*?(\d+)")


def _check_size(chars: int) -> None:
    if chars > MAX_OUTPUT_CHARS:
        raise RenderLimit(f"a value of {chars:,} characters or items is larger than a template may make "
                          f"({MAX_OUTPUT_CHARS:,})")


def _check_format(fmt: str, args) -> None:
    """Field widths in a ``%`` or ``{}`` format string, and widths taken from the arguments
    (``%*d``, ``{:>{w}}``)."""
    from_args = bool(_NESTED_FIELD.search(fmt))
    for m in _WIDTHS.finditer(fmt):
        for width in m.groups():
            if width and width.isdigit():
                _check_size(int(width))
            from_args |= width == "*"
    if from_args:
        _check_size(max([a for a in args if isinstance(a, int)] + [0]))


# Filters whose output can outgrow their input, given a large number or string argument.
_GROWING_FILTERS = ("center", "indent", "format", "wordwrap", "truncate", "replace", "join", "batch", "slice",
                    "tojson", "pprint", "list")


def _checked_filter(fn):
    """A filter bounded like the sandbox's operations: integer arguments (widths) before, size after.

    Jinja also runs filters on constants while compiling; a bound that trips
    there just leaves the filter to run (and trip again) when rendering.
    """

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int):
                _check_size(value)
        if fn.__name__ == "do_format" and args and isinstance(args[0], str):
            _check_format(args[0], args[1:])
        result = fn(*args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            _check_size(len(result))
        return result

    checked._bounded = True
    return checked


_deadline = threading.local()  # .end: when the rendering under way must stop; .fired: it was told to


def _check_time() -> None:
    end = getattr(_deadline, "end", None)
    if end is not None and time.monotonic() > end:
        _deadline.fired = True
        raise OutOfTime(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")


_previous_alarm_handler = None  # what SIGALRM did before tunec's handler was installed (chained to)


def _on_alarm(signum, frame) -> None:
    if getattr(_deadline, "end", None) is None:  # not rendering: the alarm is someone else's
        if callable(_previous_alarm_handler):
            _previous_alarm_handler(signum, frame)
        return
    # Once only: a second alarm could land on the way out (in a finally clause,
    # before the bounds are lifted) and replace the first error with a stray one.
    if not _deadline.fired:
        _check_time()


def _arm(seconds: float, interval: float = 0.0) -> tuple[float, float]:
    """Point SIGALRM at tunec's handler and start the timer; returns the timer it replaced."""
    global _previous_alarm_handler
    handler = signal.getsignal(signal.SIGALRM)
    if handler is not _on_alarm:  # another user's handler is kept and chained to
        _previous_alarm_handler = handler
        signal.signal(signal.SIGALRM, _on_alarm)
    return signal.setitimer(signal.ITIMER_REAL, seconds, interval)


def _disarm(other: tuple[float, float], started: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    if other[0]:  # someone else's timer (a test runner's timeout): give it back
        left = max(other[0] - (time.monotonic() - started), 1e-3)
        signal.setitimer(signal.ITIMER_REAL, left, other[1])


def _can_time() -> bool:
    return _HAS_ITIMER and threading.current_thread() is threading.main_thread()


class render_bounds:
    """Stop a rendering that runs longer than :data:`MAX_RENDER_SECONDS`.

    In the main thread a timer (SIGALRM) interrupts any Python-level loop;
    elsewhere the sandbox's hooks (calls, operators, output) check the clock.
    Under a :class:`watchdog` the timer already ticks and a rendering only
    sets its deadline; otherwise each rendering starts and stops the timer.
    """

    def __enter__(self) -> None:
        _deadline.end, _deadline.fired = time.monotonic() + MAX_RENDER_SECONDS, False
        self.timed = not getattr(_deadline, "watching", False) and _can_time()
        if self.timed:
            self.started = time.monotonic()
            self.other = _arm(MAX_RENDER_SECONDS)

    def __exit__(self, *exc) -> None:
        _deadline.end, _deadline.fired = None, True  # first: an alarm still on its way now does nothing
        if self.timed:
            _disarm(self.other, self.started)


class watchdog:
    """A timer ticking while many rows are rendered (a chunk of a unit), so that each
    rendering under it costs no system call; each tick checks the rendering under way."""

    def __enter__(self) -> None:
        self.timed = not getattr(_deadline, "watching", False) and _can_time()
        if self.timed:
            tick = max(0.01, min(0.25, MAX_RENDER_SECONDS / 4))
            self.started = time.monotonic()
            self.other = _arm(tick, tick)
            _deadline.watching = True

    def __exit__(self, *exc) -> None:
        if self.timed:
            _deadline.watching = False
            _disarm(self.other, self.started)


_HAS_ITIMER = hasattr(signal, "setitimer")


def bounded_join(chunks: Iterable[str]) -> str:
    """Join a template's output, stopping once it passes :data:`MAX_OUTPUT_CHARS`."""
    out: list[str] = []
    total = 0
    chunks = iter(chunks)
    while batch := list(itertools.islice(chunks, 256)):  # checked per batch: Python's loop costs more than Jinja's
        total += sum(map(len, batch))
        if total > MAX_OUTPUT_CHARS:
            raise RenderLimit(f"the rendered text passed {MAX_OUTPUT_CHARS:,} characters")
        out += batch
        _check_time()  # now and then, for renderings outside the main thread
    return "".join(out)
