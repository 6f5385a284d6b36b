"""The benchmark runner (`python -m vtattn.bench`): cases in `cases`, timers in `timing`,
measured peaks and the header in `peak`, output in `report`."""

# cases registers the builders of select_cases / scenarios, which build on its Case / Impl:
# importing it first makes any import order of those modules work.
from . import cases  # noqa: E402,F401
