"""The MOSS training stages beyond the engine: scoring, the tag stage and the end-to-end demo.

Stages are run by `python -m moss_jax.main --gin_file=...` (one stage per run gin, see
experiments/runs/); `python -m moss_jax.stages.demo` chains them on the embedded demo data.
"""
