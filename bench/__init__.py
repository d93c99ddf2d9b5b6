"""Speed and memory benchmarks (run as scripts: `python bench/run_all.py`; never by pytest)."""
