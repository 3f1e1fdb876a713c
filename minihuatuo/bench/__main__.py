"""python -m minihuatuo.bench generate [options]   (see --help of each benchmark)"""
import sys

BENCHMARKS = {"generate": "minihuatuo.bench.generate",
              "sft": "minihuatuo.bench.sft",
              "ppo": "minihuatuo.bench.ppo",
              "decontam": "minihuatuo.bench.decontam",
              "kernels": "minihuatuo.bench.kernels",
              "search": "minihuatuo.bench.search",
              "gpu": "minihuatuo.bench.gpu"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m minihuatuo.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


sys.exit(main())
