"""Built-in bit policies, as data files (one <name>.toml per policy); see store/policy.py."""
