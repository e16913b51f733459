"""Config parsing: key=value overrides and YAML files read values as a user means them."""
import pytest

from zoft.config import load_config
from zoft.errors import ZoftError


@pytest.mark.parametrize("source", ["override", "yaml"])
def test_on_off_yes_no_stay_strings_for_string_keys(tmp_path, source):
    # YAML 1.1 reads off/no as False, which made `compile=off` fail as "unknown compile 'False'"
    if source == "override":
        config = load_config(overrides=["compile=off", "progress=no", "fused=yes"])
    else:
        path = tmp_path / "c.yaml"
        path.write_text("compile: off\nprogress: no\nfused: yes\n")
        config = load_config(path)
    assert config.compile == "off"
    assert config.progress is False and config.fused is True


def test_true_false_are_booleans_and_a_bad_boolean_is_one_error():
    assert load_config(overrides=["progress=false"]).progress is False
    with pytest.raises(ZoftError, match="'progress' expects bool"):
        load_config(overrides=["progress=maybe"])


def test_cpu_defaults_are_bf16_compute_and_rademacher_z_from_cpu_fast():
    from zoft.zo import get_backend
    config = load_config()
    assert config.compute_dtype == "auto" and config.distribution == "rademacher"   # resolved for device=cpu
    assert get_backend(config.backend, "cpu", config.distribution).name == "cpu-fast"
    assert get_backend("auto", "cpu", "gaussian").name == "torch"   # same Gaussian bits: old runs keep their name
    assert load_config(overrides=["device=cuda"]).distribution == "gaussian"
    assert load_config(overrides=["distribution=gaussian"]).distribution == "gaussian"
