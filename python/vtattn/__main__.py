"""`python -m vtattn [info]`: build facts, versions and the backend each op would use."""
import sys

from ._info import info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["info"]):
        sys.exit("usage: python -m vtattn [info]   (benchmarks: python -m vtattn.bench)")
    facts = info()
    backends = facts.pop("backends")
    build = facts.pop("build")
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    print("build:")
    for key, value in (build or {"(none)": "vtattn._C was not built"}).items():
        print(f"  {key:<16}  {value}")
    print("backends (op[device,dtype] -> chosen; why the others refuse):")
    for case, answer in backends.items():
        print(f"  {case}: {answer['chosen']}")
        for name, reason in answer["refusals"].items():
            print(f"      {name:<7} {reason}")


if __name__ == "__main__":
    main()
