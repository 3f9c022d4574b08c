"""The one TOML loader: RLMConfig and SimConfig read through `load_dataclass`, and a typo
names the key, the table and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlm_async._config import RLMConfig, load_dataclass
from rlm_async._governor import EndpointLimits
from rlm_async.exceptions import ConfigError
from rlm_async.sim import SimConfig


class TestLoader:
    def test_unknown_key_names_the_key_the_table_and_the_file(self, tmp_path: Path) -> None:
        """A typo in a nested table of a config file is named with its table and the file."""
        path = tmp_path / "typo.toml"
        path.write_text('[root]\nmodel = "m"\n[root.limits]\nmax_concurency = 3\n')
        with pytest.raises(
            ConfigError, match=r"typo.toml: unknown key\(s\) in \[root.limits\]: \['max_concurency'\]"
        ):
            RLMConfig.from_toml(path)

    def test_the_simulator_reads_through_the_same_loader(self, tmp_path: Path) -> None:
        """SimConfig.from_toml names the file too: one loader, one error."""
        path = tmp_path / "sim.toml"
        path.write_text("[sim.cache]\nttl = 1\n")
        with pytest.raises(ConfigError, match=r"sim.toml: unknown key\(s\) in \[sim.cache\]: \['ttl'\]"):
            SimConfig.from_toml(path)

    def test_arrays_become_tuples_and_integers_floats(self) -> None:
        """TOML arrays fill tuple fields and integers fill float fields, so configs stay hashable."""
        limits = load_dataclass(EndpointLimits, {"requests_per_minute": 500}, "limits")
        assert limits.requests_per_minute == 500.0 and isinstance(limits.requests_per_minute, float)
        config = RLMConfig.from_dict({"root": {"model": "m"}, "others": [{"model": "o"}]})
        assert isinstance(config.others, tuple) and config.others[0].model == "o"

    def test_a_value_that_is_not_a_table_is_named(self) -> None:
        """A scalar where a table belongs is a ConfigError naming the table."""
        with pytest.raises(ConfigError, match=r"\[root.limits\] must be a table, got int"):
            RLMConfig.from_dict({"root": {"model": "m", "limits": 3}}, source="c.toml")
