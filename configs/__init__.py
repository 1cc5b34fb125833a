"""Training and plan-cache configs, loaded by path (`--config=configs/base.py`); installed as
`fape_jax.configs` (pyproject.toml), where `--config=configs/NAME.py` still finds them."""
