"""The plugin paths a user takes: ``file.py:fn``, a dotted path, ``@reward`` names from a plugin file or
module (``rewards.plugins``), entry points that name a whole module, and the same in a Ray reward worker."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from rewards import RewardRunner, RewardsConfig, Sample, check_rewards, import_plugin, registry
from rewards.registry import resolve

PLUGIN = textwrap.dedent(
    """
    from dataclasses import dataclass

    from rewards import RewardResult, reward


    @dataclass
    class Weights:  # a dataclass needs its module in sys.modules while the file runs
        hit: float = 1.0


    @reward("exact_match")
    def exact_match(sample, ignore_case: bool = False):
        got, want = sample.response.strip(), str(sample.label)
        if ignore_case:
            got, want = got.lower(), want.lower()
        return Weights().hit if got == want else 0.0


    @reward("longest_in_group", group=True)
    def longest_in_group(samples):
        top = max(len(s.response) for s in samples)
        return [RewardResult(score=float(len(s.response) == top), verdict="ok") for s in samples]


    def undecorated(sample):
        return 0.5
    """
)


@pytest.fixture
def clean_registry(monkeypatch):
    """Plugins register into process-wide tables; each test gets copies so none leaks into another."""
    registry.registered()  # built-ins first, so the copy has them and they are not loaded into it
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FILE_MODULES", {})
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("rlplat_plugin_", "my_rewards_pkg", "acme_rewards")):
            del sys.modules[name]


@pytest.fixture
def plugin_file(tmp_path, clean_registry):
    path = tmp_path / "plugins" / "my_rewards.py"
    path.parent.mkdir()
    path.write_text(PLUGIN)
    return path


def test_file_path_works_like_a_dotted_path(plugin_file, tmp_path, monkeypatch):
    d = resolve(f"{plugin_file}:undecorated")
    assert d.fn(Sample()) == 0.5 and not d.group
    # Relative to the working directory, as a shell user types it; the file is imported once.
    monkeypatch.chdir(tmp_path)
    assert resolve("plugins/my_rewards.py:undecorated").fn is d.fn
    # A decorated function keeps its declared group flag when named by path.
    assert resolve("plugins/my_rewards.py:longest_in_group").group is True
    runner = RewardRunner(
        {"terms": [{"name": "plugins/my_rewards.py:exact_match", "args": {"ignore_case": True}}]}
    )
    out = runner.score([Sample(response="Paris", label="paris"), Sample(response="Rome", label="paris")])
    assert [o.score for o in out] == [1.0, 0.0]
    assert list(out[0].components) == ["exact_match"]  # metric key: the function's name, not the path


def test_decorated_names_from_plugins_work_in_a_config(plugin_file):
    with pytest.raises(ValueError, match=r"rewards\.plugins"):
        RewardRunner({"terms": [{"name": "exact_match"}]})  # the file was never imported
    runner = RewardRunner(
        {"plugins": [str(plugin_file)], "terms": [{"name": "exact_match"}, {"name": "longest_in_group"}]}
    )
    out = runner.score(
        [Sample(prompt="q", response="ab", label="ab"), Sample(prompt="q", response="abc", label="ab")]
    )
    assert [o.components["exact_match"].score for o in out] == [1.0, 0.0]
    assert [o.components["longest_in_group"].score for o in out] == [0.0, 1.0]


def test_a_module_named_by_dots_and_by_file_is_one_definition(plugin_file, monkeypatch):
    pkg = plugin_file.parent.parent / "my_rewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(pkg.parent))
    importlib.invalidate_caches()
    import_plugin("my_rewards_pkg.scores")
    assert resolve("exact_match").fn.__module__ == "my_rewards_pkg.scores"
    # The same file imported by path re-registers the same definitions: not a name clash.
    import_plugin(str(pkg / "scores.py"))
    assert resolve("my_rewards_pkg.scores:exact_match").fn(Sample(response="x", label="x")) == 1.0


def test_plugin_errors_say_what_to_do(plugin_file, tmp_path):
    with pytest.raises(ValueError, match=r"no such file 'nope\.py'.*working directory"):
        resolve("nope.py:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        resolve(f"{plugin_file}:missing")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written plugin')\n")
    with pytest.raises(ValueError, match="RuntimeError: half-written plugin"):
        import_plugin(str(broken))
    with pytest.raises(ValueError, match=r"PYTHONPATH.*path/to/file\.py"):
        RewardRunner({"plugins": ["no_such_rewards_module"], "terms": [{"name": "math"}]})
    # a name clash between two different definitions is still refused
    other = tmp_path / "other.py"
    other.write_text(
        'from rewards import reward\n\n@reward("exact_match")\ndef exact_match(sample):\n    return 1\n'
    )
    import_plugin(str(plugin_file))
    with pytest.raises(ValueError, match="already registered"):
        import_plugin(str(other))


def test_module_entry_point_registers_its_decorated_rewards(tmp_path, monkeypatch, clean_registry):
    """A distribution whose entry point names a module, not a function: loading it runs the decorators, so
    every name it registers resolves, including names other than the entry point's."""
    (tmp_path / "acme_rewards").mkdir()
    (tmp_path / "acme_rewards" / "__init__.py").write_text(PLUGIN.replace('"exact_match"', '"acme_exact"'))
    dist = tmp_path / "acme_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlplat.rewards]\nacme = acme_rewards\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert resolve("acme_exact").fn(Sample(response="1", label=1)) == 1.0
    assert resolve("longest_in_group").group is True
    with pytest.raises(ValueError, match="registers no reward named 'acme'"):
        resolve("acme")


@pytest.mark.ray
def test_reward_worker_imports_plugins_itself(plugin_file, tmp_path, monkeypatch):
    """A Ray reward worker is another process: it must import the plugin file on its own, from the same
    relative path the user wrote in the config."""
    ray = pytest.importorskip("ray")
    import torch

    from actors.reward import RewardWorker
    from rlplat.data.prompts import PromptItem
    from rlplat.train.batch import SampleGroups

    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        config = {
            "plugins": ["plugins/my_rewards.py"],
            "terms": [{"name": "exact_match"}, {"name": "plugins/my_rewards.py:undecorated"}],
        }
        actor = ray.remote(RewardWorker).options(num_cpus=0.5).remote(config)
        packed = SampleGroups.pack([[1]], [[2], [3]], [torch.zeros(1)] * 2, [0, 0], ["a", "b"])
        scores = ray.get(actor.score_groups.remote(packed, 0, [PromptItem("q", "q", "a")]))
        # exact_match: 1 for "a", 0 for "b"; undecorated: 0.5 for both (weights 1)
        assert scores.rewards == [1.5, 0.5]
        ray.kill(actor)
    finally:
        ray.shutdown()


def test_check_rewards_is_the_drivers_preflight(plugin_file):
    """What `rlplat run` checks before starting workers: plugins import, every term resolves, nothing runs."""
    check_rewards(RewardsConfig(plugins=[str(plugin_file)], terms=[{"name": "exact_match"}]))
    with pytest.raises(ValueError, match=r"rewards\.terms\.1 \('nope'\): unknown reward 'nope'"):
        check_rewards(RewardsConfig(terms=[{"name": "math"}, {"name": "nope"}]))
    with pytest.raises(TypeError, match="RewardsConfig"):
        check_rewards({"terms": []})  # type: ignore[arg-type]
