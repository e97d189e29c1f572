"""The benchmarks behind `maskpro-bench`, installed as ``maskpro.bench`` (see cli.py)."""
