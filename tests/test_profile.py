"""Profiles: validated at load, unknown keys are errors naming them, --set overrides."""

import pytest

from echat.pipelines.profile import ProfileError, available_profiles, load_profile


def test_local_profile_loads_with_offline_backends():
    profile = load_profile("local")
    stages = dict(profile.stage_choices())
    assert stages["vad"].backend == "silero" and stages["asr"].backend == "pocketsphinx"
    assert stages["reply"].backend == "template" and stages["tts"].backend == "espeak"
    assert "local" in available_profiles()


@pytest.mark.parametrize(
    "override, named",
    [
        ("vadd.backend=silero", "vadd"),  # a mistyped section
        ("filters.min_snr=3", "filters.min_snr"),  # a mistyped option
        ("output.rows_per_shrd=10", "output.rows_per_shrd"),
        ("vad.params.treshold=0.4", "treshold"),  # a mistyped backend parameter
    ],
)
def test_unknown_key_is_an_error_naming_it(override, named):
    with pytest.raises(ProfileError, match=named.replace(".", r"\.")):
        load_profile("local", [override])


def test_unknown_key_in_a_profile_file(tmp_path):
    text = (load_profile.__globals__["configs_dir"]() / "local.yaml").read_text()
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace("trust_manifest:", "trust_manifets:"))
    with pytest.raises(ProfileError, match="trust_manifets"):
        load_profile(str(path))


def test_unknown_backend_is_named():
    with pytest.raises(ProfileError, match="gpt-99"):
        load_profile("local", ["reply.backend=gpt-99"])


def test_set_overrides_values_with_yaml_types():
    profile = load_profile("local", ["vad.params.threshold=0.35", "filters.min_snr_db=5", "beam.direct_num_workers=2"])
    assert profile.vad.params["threshold"] == 0.35
    assert profile.filters.min_snr_db == 5.0
    assert profile.beam.direct_num_workers == 2


def test_bad_value_type_is_reported():
    with pytest.raises(ProfileError, match="rows_per_shard"):
        load_profile("local", ["output.rows_per_shard=-3"])


def test_unknown_profile_name_lists_available():
    with pytest.raises(ProfileError, match="available: .*local"):
        load_profile("nonexistent-profile")
