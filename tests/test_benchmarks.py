"""Helpers of the benchmark scripts (the scripts themselves run on real data)."""

import chex
import numpy as np
import pytest

from benchmarks.brick_interference import match_covariances, polish
from benchmarks.brick_retention import VARIANTS, brick_reads
from benchmarks import across, judge, norm_interaction, null_means, overshoot, polish_path
from benchmarks.retention_protocol import reads
from lego_jax import config as config_lib
from lego_jax.errors import LegoError
from lego_jax.requests import Unlearner
from lego_jax.workdir import Workdir


def _classes(seed=0):
  rng = np.random.default_rng(seed)
  codes = np.repeat([0, 1, -1], [300, 200, 20])
  scale = np.where(codes[:, None] == 1, 2.0, 1.0) * np.array([1.0, 0.5, 3.0])
  return rng.normal(size=(codes.size, 3)) * scale + codes[:, None], codes


def _cov(x, codes, c):
  return np.cov(x[codes == c].T)


def test_match_covariances_equalises_class_covariances_and_keeps_means():
  x, codes = _classes()
  out = match_covariances(x, codes, 1.0, prior=0.0)
  np.testing.assert_allclose(_cov(out, codes, 0), _cov(out, codes, 1), atol=1e-8)
  for c in (0, 1):
    np.testing.assert_allclose(out[codes == c].mean(0), x[codes == c].mean(0), atol=1e-10)
  np.testing.assert_array_equal(out[codes < 0], x[codes < 0])
  np.testing.assert_allclose(match_covariances(x, codes, 0.0), x)


def test_a_null_draw_leaves_the_sampling_noise_of_independent_classes():
  x, codes = _classes()
  out = match_covariances(x, codes, 1.0, prior=0.0, null_draw=np.random.default_rng(1))
  gap = np.abs(_cov(out, codes, 0) - _cov(out, codes, 1)).max()
  assert 1e-3 < gap < np.abs(_cov(x, codes, 0) - _cov(x, codes, 1)).max()


def _axis_signal(n=600, d=8, seed=0):
  """Class 1 far from 0 on coordinate 0, class 0 near it; the other coordinates noise."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2, n)
  x = rng.normal(size=(n, d))
  x[:, 0] = np.where(codes == 1, rng.choice([-1.0, 1.0], n) * rng.uniform(0.6, 1.0, n),
                     rng.uniform(-0.4, 0.4, n))
  return x, codes


def test_judges_read_a_planted_signal_and_nothing_in_permuted_labels():
  x, codes = _axis_signal()
  read = judge.judge(x, codes, judges=("gbdt", "knn25", "logreg", "qda"))
  for j in ("gbdt", "knn25", "qda"):              # the classes' spreads differ on coordinate 0
    assert read[j]["signed"] > 0.2 and read[j]["ci95"][0] > 0, (j, read[j])
  assert abs(read["logreg"]["signed"]) < 0.06     # no linear signal was planted
  null = judge.judge(x, np.random.default_rng(1).permutation(codes), judges=("gbdt", "qda"))
  for j in ("gbdt", "qda"):
    assert abs(null[j]["signed"]) < 0.06, null


def test_a_rotation_keeps_every_distance_of_the_standardised_table():
  x, _ = _axis_signal()
  r = judge.rotated(x, seed=3)
  z = (x - x.mean(0)) / x.std(0)
  np.testing.assert_allclose(r @ r.T, z @ z.T, atol=1e-8)
  assert not np.allclose(np.abs(r), np.abs(z), atol=0.1)
  np.testing.assert_array_equal(judge.rotated(x, seed=3), r)


def test_judge_main_reads_each_table_and_its_rotation(tmp_path):
  x, codes = _axis_signal(n=400, d=4)
  f = str(tmp_path / "t.npz")
  np.savez(f, embeddings=x.astype(np.float32), attr_gender=codes)
  out = judge.main([f, "--rotate", "--judges", "logreg", "--json"])
  assert set(out) == {f, f + " (rotated)"}
  assert set(out[f]) == {"gender"} and set(out[f]["gender"]) == {"logreg"}


def _leading_signal(n=1200, d=80, seed=0):
  """Two high-variance directions whose quadrants carry the class (its class
  means are equal), turned into the table among d - 2 noise ones."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2, n)
  lead = rng.normal(size=(n, 2)) * 4.0
  lead[:, 1] = np.abs(lead[:, 1]) * np.sign(lead[:, 0]) * np.where(codes == 1, 1.0, -1.0)
  x = np.concatenate([lead, rng.normal(size=(n, d - 2))], 1)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return x @ q, codes, q[:2]


def test_the_principal_view_is_the_leading_directions_standardised():
  x, codes, lead = _leading_signal()
  p = judge.principal(x, 2)
  chex.assert_shape(p, (len(x), 2))
  np.testing.assert_allclose(np.cov(p, rowvar=False), np.eye(2), atol=1e-8)
  # Its span is the planted directions' span (up to sampling noise).
  basis = np.linalg.lstsq(x - x.mean(0), p, rcond=None)[0]
  q, _ = np.linalg.qr(basis)
  assert np.linalg.svd(q.T @ lead.T, compute_uv=False).min() > 0.95
  # A neighbour vote reads the quadrants there, not in permuted labels.
  read = judge.judge(p, codes, judges=("knn25",))["knn25"]["signed"]
  null = judge.judge(p, np.random.default_rng(1).permutation(codes), judges=("knn25",))
  assert read > 0.3 and abs(null["knn25"]["signed"]) < 0.06, (read, null)


def test_judge_main_adds_the_principal_view(tmp_path):
  x, codes, _ = _leading_signal(n=400, d=6)
  f = str(tmp_path / "t.npz")
  np.savez(f, embeddings=x.astype(np.float32), attr_gender=codes)
  out = judge.main([f, "--principal", "2", "--judges", "logreg", "--json"])
  assert set(out) == {f, f + " (2 PCs)"}
  with pytest.raises(SystemExit, match="--principal"):
    judge.main([f, "--principal", "-1"])


def test_judge_over_seeds_is_the_mean_of_each_seeds_reading():
  x, codes = _axis_signal(n=400, d=4)
  runs = [judge.judge(x, codes, ("logreg",), seed=s)["logreg"]["signed"] for s in (4, 5, 6)]
  over = judge.judge(x, codes, ("logreg",), seed=4, seeds=3)["logreg"]
  assert over["signed"] == pytest.approx(np.mean(runs))
  assert over["ci95"][0] < over["signed"] < over["ci95"][1]
  assert len(set(runs)) > 1          # the seeds down-sample and fold differently


def test_judge_labels_mode_judges_each_table_under_its_own_seeds(tmp_path):
  """Tables labelled by one export must not share one down-sampling: their
  mean would then carry that down-sampling's luck in every term."""
  x, codes = _axis_signal(n=400, d=4)
  tables, labels = str(tmp_path / "tables.npz"), str(tmp_path / "labels.npz")
  np.savez(tables, run0=x, run1=x)
  np.savez(labels, embeddings=x, attr_gender=codes)
  out = judge.main([tables, "--labels", labels, "--judges", "logreg", "--json"])
  first = out[f"{tables}:run0"]["gender"]["logreg"]["signed"]
  second = out[f"{tables}:run1"]["gender"]["logreg"]["signed"]
  assert first == judge.judge(x, codes, ("logreg",), seed=1)["logreg"]["signed"]
  assert second == judge.judge(x, codes, ("logreg",), seed=2)["logreg"]["signed"]
  assert first != second


def _norm_scaled(n=1200, d=8, seed=5):
  """An original table whose class signal grows with the row norm, and that
  table less one class shift the same for every user (class means agree)."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2, n)
  scale = rng.uniform(0.5, 2.0, n)
  sign = np.where(codes == 1, 1.0, -1.0)
  x0 = rng.normal(size=(n, d)) * scale[:, None]
  x0[:, 0] += sign * scale
  x = x0.copy()
  for c in (0, 1):
    x[codes == c] -= x0[codes == c].mean(0) - x0.mean(0)
  return x0, x, codes


def test_norm_ranges_show_a_class_shift_that_ignores_the_norm():
  x0, x, codes = _norm_scaled()
  r0 = norm_interaction.row_norm(x0)
  assert norm_interaction.separation(x, codes) < 0.01      # overall the classes agree
  cells = norm_interaction.by_norm(x, codes, r0, bins=3, perms=10)
  assert [c["users"] for c in cells] == [400, 400, 400]
  assert cells[0]["ratio"] > 3 and cells[2]["ratio"] > 3, cells   # light and heavy users
  null = norm_interaction.by_norm(x, np.random.default_rng(2).permutation(codes), r0, perms=10)
  assert all(0.5 < c["ratio"] < 2 for c in null), null


def test_norm_interaction_main_reads_original_and_own_norm(tmp_path):
  x0, x, codes = _norm_scaled(n=300, d=4)
  orig, table = str(tmp_path / "o.npz"), str(tmp_path / "t.npz")
  np.savez(orig, embeddings=x0.astype(np.float32), attr_gender=codes)
  np.savez(table, embeddings=x.astype(np.float32), attr_gender=codes)
  out = norm_interaction.main([table, "--original", orig, "--perms", "3", "--json"])
  assert set(out) == {orig, table}
  assert set(out[table]["gender"]) == {"original norm", "own norm"}


def test_null_means_reads_sizes_and_writes_the_sized_table(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 3, 600)
  leak = (rng.normal(size=(600, 6)) + rng.normal(size=(3, 6))[codes]).astype(np.float32)
  f = str(tmp_path / "t.npz")
  np.savez(f, embeddings=leak, attr_age=codes, attr_age_classes=np.array(["a", "b", "c"]))
  out = null_means.main([f, "--out", str(tmp_path / "sized"), "--json"])
  assert out[f]["age"]["before"]["means"] > 20 and 0.8 < out[f]["age"]["after"]["means"] < 1.25
  written = np.load(tmp_path / "sized" / "t.npz")
  np.testing.assert_array_equal(written["attr_age"], codes)
  assert null_means.size_ratio(written["embeddings"], codes) == pytest.approx(
      out[f]["age"]["after"]["means"])


def test_null_means_reads_and_sizes_class_covariances(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 2, 800)
  x = rng.normal(size=(800, 6)) * np.where(codes[:, None] == 1, 1.5, 1.0)
  f = str(tmp_path / "t.npz")
  np.savez(f, embeddings=x.astype(np.float32), attr_gender=codes)
  plain = null_means.main([f, "--json"])[f]["gender"]
  sized = null_means.main([f, "--covariances", "--out", str(tmp_path / "s"), "--json"])[f]["gender"]
  assert plain["before"]["covariances"] > 5 and plain["after"]["covariances"] > 5
  assert 0.6 < sized["after"]["covariances"] < 1.6
  written = np.load(tmp_path / "s" / "t.npz")["embeddings"]
  assert null_means.size_ratio(written, codes, sizes=null_means.covariance_sizes) == pytest.approx(
      sized["after"]["covariances"])


def test_null_means_simulation_reads_removed_class_means_below_chance():
  out = null_means.main(["--simulate", "--users", "1000", "--dims", "16", "--runs", "2",
                         "--json"])
  assert out["class means removed"]["signed"] < -0.05 and out["class means removed"]["size"] < 0.01
  assert abs(out["null_means"]["signed"]) < 0.04 and 0.8 < out["null_means"]["size"] < 1.25


def test_class_mean_sizes_in_each_metric_see_a_leak_and_an_in_sample_removal():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 2, 800)
  spread = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.01])
  x = rng.normal(size=(800, 6)) * spread
  removed = x - np.stack([x[codes == k].mean(0) for k in (0, 1)])[codes] + x.mean(0)
  leak = x + np.where(codes[:, None] == 1, 0.5, -0.5) * np.eye(6)[0]
  for m in null_means.METRICS:
    assert null_means.size_ratio(removed, codes, metric=m) < 1e-6, m
    assert null_means.size_ratio(leak, codes, metric=m) > 20, m
  for m in ("within", "coordinates"):   # Euclidean: one chi-square per coordinate, a coin toss
    assert 0.3 < null_means.size_ratio(x, codes, metric=m) < 3.0, m
  # A shift of five spreads on the coordinate a hundredth as wide as the rest:
  # large within classes and per coordinate, lost in the Euclidean sum.
  small = x + np.where(codes[:, None] == 1, 0.05, -0.05) * np.eye(6)[5]
  assert null_means.size_ratio(small, codes, metric="coordinates") > 20
  assert null_means.size_ratio(small, codes, metric="euclidean") < 2.0
  with pytest.raises(ValueError, match="valid: within, coordinates, euclidean"):
    null_means.class_sizes(x, codes, metric="cosine")


def test_overshoot_reads_each_table_with_its_labels_and_permuted_ones(fresh_workdir, tmp_path):
  wd = Workdir.open(fresh_workdir)
  table = np.asarray(Unlearner(wd, progress=False).table("original"))
  names = wd.attribute_names()
  y = np.asarray(wd.labels(names)[0])[0]
  leaky = table.copy()
  leaky[:, 0] += np.where(y == 1, 5.0, 0.0) * table[:, 0].std()   # class 1 five spreads away
  one, two = tmp_path / "one.npz", tmp_path / "two.npz"
  np.savez(one, embeddings=leaky)
  np.savez(two, run0=table, run1=table[::-1].copy())
  out = overshoot.main(["--workdir", str(fresh_workdir), str(one), "--perms", "3", "--json"])
  assert list(out) == names
  signed, _ = overshoot.readings(leaky, *wd.labels(names), names, attacker="linear",
                                 seed=wd.config["seed"], config=wd.config["attack"],
                                 perms=0)[names[0]]
  first = out[names[0]]
  assert first["linear"]["signed"] == pytest.approx(signed)
  # The planted leak: read on the labels, gone under permuted ones.
  for a in overshoot.ATTACKERS:
    assert first[a]["signed"] > 0.3 and abs(first[a]["permuted"]) < 0.1, (a, first[a])
  assert min(first["sizes"].values()) > 5
  for n in names:
    assert set(out[n]) == {"sizes", "mlp", "linear"} and set(out[n]["sizes"]) == set(
        null_means.METRICS)
  # A sweep's tables: each read with its own seed, the means over them reported.
  both = overshoot.main(["--workdir", str(fresh_workdir), str(two), "--perms", "1", "--json"])
  assert set(overshoot.tables(str(two), 7)) == {"run0", "run1"}
  assert [s for _, s in overshoot.tables(str(two), 7).values()] == [7, 8]
  assert both[names[0]]["sizes"]["within"] != out[names[0]]["sizes"]["within"]


@pytest.mark.slow
def test_polish_moves_only_under_its_losses_and_repeats_exactly(fresh_workdir):
  u = Unlearner(Workdir.open(fresh_workdir), progress=False)
  table = np.asarray(u.target().e0)
  move = polish(u, table, ["gender", "age"], "features", 6)
  assert move.shape == table.shape and np.isfinite(move).all()
  assert np.abs(move).max() > 0
  np.testing.assert_array_equal(polish(u, table, ["gender", "age"], "features", 6), move)
  # Without the MI term and the ranking hinge only the pull to `table` is left: nothing moves.
  still = polish(u, table, ["gender"], "mmd", 6, ["w_mi=0", "lam_rank=0"])
  np.testing.assert_allclose(still, 0.0, atol=1e-6)


def test_retention_is_read_under_both_protocols(fresh_workdir):
  wd = Workdir.open(fresh_workdir)
  e0 = np.asarray(wd.backbone().table())
  same = reads(wd, e0)
  assert len(same) == 4 and all(r == {"retention": 1.0, "bootstrap_sd": 0.0} for r in same.values())
  noisy = reads(wd, e0 + np.random.default_rng(0).normal(size=e0.shape).astype(e0.dtype))
  assert all(r["retention"] < 1.0 and r["bootstrap_sd"] > 0 for r in noisy.values())
  # Masking the other split's items changes what is read: the protocols differ.
  assert noisy["valid (test items compete)"] != noisy["valid, test items masked"]


@pytest.mark.slow
def test_brick_retention_reads_each_variant_of_the_stored_brick(fresh_workdir):
  u = Unlearner(Workdir.open(fresh_workdir), progress=False)
  u.calibrate(["gender"])
  out = brick_reads(u, "gender")
  assert set(out["retention"]) == set(VARIANTS)
  assert all(0.0 < r < 1.5 for r in out["retention"].values())
  # The loop's gains are read on the stored delta, not on an already scaled one.
  delta = u.with_gains(["gender"], u._load_brick("gender")[None], [[1.0, 1.0]])[0]
  assert out["retention"]["loop's gains"] == u.retention(np.asarray(u.target().e0) + delta)
  # Shrinking the class-mean part cannot read as stretching it: each variant is its own table.
  assert out["retention"]["mean x0.75"] != out["retention"]["mean x1.25"]


def test_mean_share_runs_the_combination_loop_at_each_share_without_writing(fresh_workdir):
  import json
  from benchmarks.mean_share import share_reads
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  Unlearner(wd, progress=False).unlearn(names)
  path = fresh_workdir / "combination" / "metadata.json"
  stored = path.read_text()
  same = share_reads(wd, wd.config["unlearn"]["mean_share"])
  assert path.read_text() == stored
  # At the config's own share the benchmark is the loop that made the stored table.
  meta = json.loads(stored)
  assert same["retention_valid"] == meta["retention_valid"] and same["gains"] == meta["gains"]
  for r in (same, share_reads(wd, 0.75, fresh_workdir / "shares")):
    assert set(r["leakage"]["mlp"]) == set(r["leakage"]["linear"]) == set(names)
    assert 0.0 < r["retention_test"] < 1.5
  written = np.load(fresh_workdir / "shares" / "share_0.75.npz")
  assert written["embeddings"].shape == Unlearner(wd, progress=False).table("combined").shape
  np.testing.assert_array_equal(written["attr_gender"], wd.labels(["gender"])[0][0])
  # An override changes the loop, not the workdir: without control no gain is searched.
  config = (fresh_workdir / "config.json").read_text()
  off = share_reads(wd, 1.0, overrides=['unlearn.control="none"'])
  assert all(g == [1.0, 1.0] for g in off["gains"].values())
  assert path.read_text() == stored and (fresh_workdir / "config.json").read_text() == config
  with pytest.raises(LegoError, match="unlearn.control"):
    share_reads(wd, 1.0, overrides=['unlearn.control="sometimes"'])


def _balanced_in_each_part(x, codes, part):
  """`x` with each part's class means set to that part's mean: a balance in sample."""
  out = x.copy()
  for p in np.unique(part):
    for c in np.unique(codes):
      s = (part == p) & (codes == c)
      out[s] -= out[s].mean(0) - out[part == p].mean(0)
  return out


def test_across_parts_reads_the_residual_that_a_balance_in_sample_turns_over(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 2, 1200)
  part = across.parts_of(codes.size, 2, seed=0)
  assert sorted(np.bincount(part)) == [600, 600]
  np.testing.assert_array_equal(part, across.parts_of(codes.size, 2, seed=0))
  noise = rng.normal(size=(codes.size, 8))
  balanced = _balanced_in_each_part(noise, codes, part)
  residual = balanced + 0.3 * codes[:, None] * np.eye(8)[0]
  read = {name: across.across(x, codes, part, ("logreg",))["logreg"]
          for name, x in (("noise", noise), ("balanced", balanced), ("residual", residual))}
  assert abs(read["noise"]["within"]) < 0.03 and abs(read["noise"]["across"]) < 0.03
  # The balance alone: its mirror reads below chance inside a part, nothing across parts.
  assert read["balanced"]["within"] < -0.03 and abs(read["balanced"]["across"]) < 0.03
  # A residual shared by the parts: read across, partly hidden inside each part.
  assert read["residual"]["across"] > 0.04
  assert read["residual"]["across"] > read["residual"]["within"] + 0.02
  f = str(tmp_path / "t.npz")
  np.savez(f, embeddings=residual, attr_gender=codes)
  assert across.main(["--table", f, "--judges", "logreg", "--json"]) == {
      "gender": {"logreg": read["residual"]}}
  with pytest.raises(SystemExit, match="no attribute 'age'; it has: gender"):
    across.main(["--table", f, "--attributes", "age", "--json"])
  # Over seeds, the mean of each seed's reading.
  per_seed = [across.across(residual, codes, part, ("logreg",), seed=s)["logreg"] for s in (1, 2)]
  both = across.main(["--table", f, "--judges", "logreg", "--seeds", "2", "--json"])
  for k in ("within", "across"):
    assert both["gender"]["logreg"][k] == pytest.approx(np.mean([r[k] for r in per_seed]))


def test_across_unlearns_each_part_on_a_copy_and_leaves_the_workdir(fresh_workdir, tmp_path):
  before = sorted(p.relative_to(fresh_workdir) for p in fresh_workdir.rglob("*"))
  wd = Workdir.open(fresh_workdir)
  name = wd.attribute_names()[0]
  out = tmp_path / "parts.npz"
  res = across.main(["--workdir", str(fresh_workdir), "--attributes", name,
                     "--judges", "logreg", "--out", str(out), "--json"])
  assert set(res) == {name} and set(res[name]["logreg"]) == {"within", "across"}
  z = np.load(out)
  original = np.asarray(wd.backbone(progress=False).table())
  codes, _ = wd.labels([name])
  part = across.parts_of(codes.shape[1], 2, seed=0)
  moved = np.abs(z["embeddings"] - original).max(axis=1) > 0
  for p in (0, 1):   # every part's labelled users were unlearned in their own run
    assert moved[(part == p) & (codes[0] >= 0)].mean() > 0.5
  np.testing.assert_array_equal(z[f"attr_{name}"], codes[0])
  assert sorted(p.relative_to(fresh_workdir) for p in fresh_workdir.rglob("*")) == before


def test_polish_path_records_each_polish_and_reads_it_along_its_gain(fresh_workdir,
                                                                   polish_reads_above):
  sets = ["unlearn.target_leakage=0",
          "unlearn.mean_share=1", "unlearn.attributes=[\"gender\"]"]
  out = polish_path.main(["--workdir", str(fresh_workdir), "--seeds", "2", "--gains", "0,1",
                          "--attackers", "linear", "--repeats", "1", "--json",
                          *(x for s in sets for x in ("--set", s))])
  polishes = out["polishes"]
  assert sorted(p["seed"] for p in polishes) == [0, 1]
  wd = Workdir.open(fresh_workdir)
  u = Unlearner(wd, progress=False,
                config=config_lib.apply_overrides(wd.config, sets))
  recorded = polish_path.Recording.polishes
  for p, rec in zip(polishes, recorded):
    assert p["attributes"] == ["gender"] and [r["gain"] for r in p["path"]] == sorted(
        {0.0, 1.0, p["gain"]})
    # Gain 0 is the table the polish started from, as the loop keeps it.
    start = u.null_sized(rec["table"], rec["active"], rec["seed"])
    assert p["path"][0]["retention"] == pytest.approx(u.retention(start))
    # The move recorded is the one the polish made.
    np.testing.assert_allclose(rec["move"], u.polish_move(rec["table"], ["gender"], rec["seed"]),
                               atol=1e-5)
  kept = out["summary"]["kept"]["linear"]["gender"]
  assert kept == pytest.approx(np.mean([next(r["read"]["linear"]["gender"] for r in p["path"]
                                             if r["gain"] == p["gain"]) for p in polishes]))
  centred = polish_path.moved(u, recorded[0], "centred")
  labels = np.asarray(wd.labels(recorded[0]["active"])[0])
  for y in labels:
    for c in np.unique(y[y >= 0]):                   # no class-mean part left in the move
      np.testing.assert_allclose(centred[y == c].mean(0), centred[y >= 0].mean(0), atol=1e-4)
