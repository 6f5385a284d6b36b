"""`python -m vtattn [info]`: versions, where vtattn and its compiled part load from, build facts and
the backend each op would use. `python -m vtattn build-check`: whether this environment's build of
the checkout is current (exit 0, "reusing the build ...") or must be rebuilt (exit 1, why); the
setup scripts ask it before building."""
import sys

USAGE = "usage: python -m vtattn [info | build-check]   (benchmarks: python -m vtattn.bench)"


def build_check() -> int:
    import logging
    logging.getLogger("vtattn").setLevel(logging.ERROR)  # the reason is printed below, once
    from . import _ext
    root = _ext.checkout_root()
    if root is None:
        print(f"vtattn is not imported from a checkout ({_ext.PACKAGE}): nothing to reuse")
        return 1
    reason = _ext.stale_reason(root)
    if reason:
        print(f"building: {reason}")
        return 1
    facts, (path, _) = _ext.build_info(), _ext.location()
    print(f"reusing the build from {path} (sources {facts['sources']} and torch {facts['torch']} unchanged; "
          f"{'CUDA ' + ','.join(facts['cuda_archs']) if facts['with_cuda'] else 'CPU only'})")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["build-check"]:
        sys.exit(build_check())
    if argv not in ([], ["info"]):
        sys.exit(USAGE)
    from ._info import info
    facts = info()
    backends = facts.pop("backends")
    build = facts.pop("build")
    environment = facts.pop("environment")
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    print("build:")
    for key, value in (build or {"(none)": "no vtattn._C loaded"}).items():
        print(f"  {key:<16}  {value}")
    print("environment (python/vtattn/_env.py):")
    for key, value in environment.items():
        print(f"  {key:<22}  {value}")
    print("backends (op[device,dtype] -> chosen; why the others refuse):")
    for case, answer in backends.items():
        print(f"  {case}: {answer['chosen']}")
        for name, reason in answer["refusals"].items():
            print(f"      {name:<7} {reason}")


if __name__ == "__main__":
    main()
