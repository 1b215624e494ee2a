"""bench/quality.py: which runs it leaves out (one_try where it is the recommended run, Atropos of
another seed, the options left off) and that it runs them where they differ."""

import json
import os
import subprocess

import pytest

from bench import quality


def _recommended(root, data='demo', seed=0, history=None, nmi=0.5, atropos=False, layer=None):
  ref = os.path.join(root, f'{data}-s{seed}-recommended')
  os.makedirs(os.path.join(ref, 'baselines'))
  with open(os.path.join(ref, 'train_history.json'), 'w') as f:
    json.dump(history if history is not None else {'periods': []}, f)
  with open(os.path.join(ref, 'report.json'), 'w') as f:
    rep = {'nmi': {'jule3d': nmi}, 'uncovered_fraction': {'jule3d': 0.01}}
    json.dump({**rep, 'reading': layer and {'layer': layer, 'why': 'auto'}}, f)
  if atropos:
    os.makedirs(os.path.join(ref, 'baselines', 'atropos.zarr'))
    with open(os.path.join(ref, 'baselines', 'atropos.zarr', '.zattrs'), 'w') as f:
      json.dump({'seed_of': seed}, f)
  return ref


class _Ran(Exception):
  pass


def _no_cli(monkeypatch):
  def run(cmd, **kwargs):
    raise _Ran(cmd)

  monkeypatch.setattr(subprocess, 'run', run)


def test_one_try_is_the_recommended_run_where_it_trained_once(tmp_path, monkeypatch):
  _no_cli(monkeypatch)
  _recommended(str(tmp_path), nmi=0.612)
  got = quality._run('demo', 0, 'one_try', str(tmp_path))
  assert got['nmi'] == {'jule3d': 0.612}
  assert got['same_run'] == quality.SAME_RUN['one_try']


def test_one_try_runs_where_the_recommended_run_trained_again(tmp_path, monkeypatch):
  _no_cli(monkeypatch)
  _recommended(str(tmp_path), history={'periods': [], 'tries': [{'seed': 0}, {'seed': 1000}]})
  with pytest.raises(_Ran) as ran:
    quality._run('demo', 0, 'one_try', str(tmp_path))
  assert '--config.train.tries=1' in ran.value.args[0]


@pytest.mark.parametrize('layer', ['embedding', 'hidden'])
def test_a_layer_variant_is_the_recommended_run_where_that_run_read_its_layer(
  tmp_path, monkeypatch, layer
):
  _no_cli(monkeypatch)
  _recommended(str(tmp_path), nmi=0.655, layer=layer)
  got = quality._run('demo', 0, f'{layer}_layer', str(tmp_path))
  assert got['nmi'] == {'jule3d': 0.655} and got['same_run'] == quality.SAME_RUN[f'{layer}_layer']
  other = {'embedding': 'hidden', 'hidden': 'embedding'}[layer]
  with pytest.raises(_Ran) as ran:  # the other layer is another run
    quality._run('demo', 0, f'{other}_layer', str(tmp_path))
  assert f'--config.segment.layer={other}' in ran.value.args[0]


def test_atropos_of_another_seed_of_the_same_data_only(tmp_path, monkeypatch):
  _no_cli(monkeypatch)
  root = str(tmp_path)
  _recommended(root, data='mni152', seed=0, atropos=True)
  _recommended(root, data='demo', seed=1)
  with pytest.raises(_Ran):
    quality._run('demo', 1, 'no_smoothing', root)
  assert not os.path.exists(os.path.join(root, 'demo-s1-no_smoothing', 'baselines', 'atropos.zarr'))
  _recommended(root, data='demo', seed=0, atropos=True)
  with pytest.raises(_Ran):
    quality._run('demo', 2, 'recommended', root)
  with open(os.path.join(root, 'demo-s2-recommended', 'baselines', 'atropos.zarr', '.zattrs')) as f:
    assert json.load(f) == {'seed_of': 0}


def test_the_options_left_off_run_only_when_named(tmp_path, monkeypatch):
  ran = []
  monkeypatch.setattr(quality, '_run', lambda d, s, v, root, cache=True: ran.append(v) or {
    'nmi': {'jule3d': 0.5}, 'wall_s': 1.0})  # fmt: skip
  monkeypatch.setattr(quality.common, 'publish', lambda *a, **k: None)
  quality.main(['--data=demo', '--seeds=0', f'--workdir={tmp_path / "a"}'])
  assert 'recommended' in ran and 'paper' in ran
  assert not set(quality.OPTIONAL) & set(ran)
  ran.clear()
  quality.main(['--data=demo', '--seeds=0', '--variants=all', f'--workdir={tmp_path / "b"}'])
  assert ran == sorted(quality.VARIANTS, key=lambda v: v != 'recommended')
