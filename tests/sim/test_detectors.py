"""Drift detectors: calibration to a false-alarm rate, detection on writers streams, evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.detector_eval import (
    evaluate_detectors,
    evaluate_stream,
    make_stream,
    rotate_images,
    writers_drift_data,
)
from fedmeta.sim.detectors import (
    AutoencoderDetector,
    Detector,
    DriftMonitor,
    IsolationForestDetector,
    TwoSampleDrift,
    bootstrap_batches,
    split_reference,
    threshold_from_signals,
)
from fedmeta.sim.seeding import np_rng

BATCH = 64
TARGET = 0.05


class FirstColumn(Detector):
    """Stub: a sample's score is its first feature, so a stream of constant batches has fixed signals."""

    def _fit(self, x: np.ndarray) -> None:
        pass

    def _score(self, x: np.ndarray) -> np.ndarray:
        return x[:, 0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a tiny MLP trains fastest on one thread; several threads on a busy machine are many times slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rotation():
    return writers_drift_data(0, "rotation")


@pytest.fixture(scope="module")
def detectors(rotation):
    reference = rotation[0]
    dets = {
        "autoencoder": AutoencoderDetector(epochs=20, seed=0),
        "isolation_forest": IsolationForestDetector(seed=0),
    }
    for name, det in dets.items():
        det.fit_calibrated(reference, TARGET, BATCH, np_rng(0, "test-calibrate", name))
    return dets


# ---------------------------------------------------------------- calibration
@pytest.mark.parametrize("name", ["autoencoder", "isolation_forest"])
def test_alarm_rate_on_fresh_drift_free_batches_is_near_the_target(rotation, detectors, name):
    _, pre, _ = rotation  # writers the detectors never saw, same population
    det = detectors[name]
    batches = make_stream(pre, pre, BATCH, 200, 200, np_rng(0, "test-fresh"))
    rate = np.mean([det.alarm(b) for b in batches])
    assert rate <= 0.12, f"{name}: {rate:.3f} of drift-free batches alarm at target {TARGET}"


def test_calibrate_on_explicit_batches_equals_fit_calibrated():
    reference = np_rng(1, "ref").random((600, 3), dtype=np.float32)  # detectors compute in float32
    quick = FirstColumn().fit_calibrated(reference, 0.1, 16, np_rng(1, "cal"), holdout=0.4, n_batches=300)
    rng = np_rng(1, "cal")  # replay the same draws by hand
    fit_part, cal = split_reference(reference, 0.4, rng)
    idx = bootstrap_batches(len(cal), 16, 300, rng)
    slow = FirstColumn().fit(fit_part)
    assert slow.calibrate([cal[i] for i in idx], 0.1) == pytest.approx(quick.threshold, rel=1e-12)
    np.testing.assert_array_equal(quick.reference_scores, cal[:, 0])


def test_fit_calibrated_is_deterministic_in_the_seed():
    reference = np_rng(2, "ref").random((300, 16)).astype(np.float32)
    a, b = (
        AutoencoderDetector(latent=4, epochs=2, seed=5).fit_calibrated(reference, 0.1, 8, np_rng(2, "c"))
        for _ in range(2)
    )
    assert a.threshold == b.threshold
    np.testing.assert_array_equal(a.reference_scores, b.reference_scores)


@settings(max_examples=50, deadline=None)
@given(
    signals=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200),
    rates=st.tuples(st.floats(1e-3, 0.999), st.floats(1e-3, 0.999)),
)
def test_threshold_is_monotone_in_the_false_alarm_rate(signals, rates):
    low, high = sorted(rates)
    assert threshold_from_signals(signals, low) >= threshold_from_signals(signals, high)
    # alarm is signal > threshold: at most the targeted share of calibration signals alarms
    assert np.mean(np.asarray(signals) > threshold_from_signals(signals, low)) <= low


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), rates=st.tuples(st.floats(0.01, 0.99), st.floats(0.01, 0.99)))
def test_calibrated_thresholds_are_monotone(seed, rates):
    low, high = sorted(rates)
    reference = np_rng(seed, "ref").random((200, 2))
    thresholds = [
        FirstColumn().fit_calibrated(reference, r, 8, np_rng(seed, "cal"), n_batches=100).threshold
        for r in (low, high)
    ]
    assert thresholds[0] >= thresholds[1]


# ---------------------------------------------------------------- detection on writers streams
@pytest.mark.parametrize("name", ["autoencoder", "isolation_forest"])
def test_rotation_is_detected_within_three_batches(rotation, detectors, name):
    _, pre, post = rotation
    stream = make_stream(pre, post, BATCH, 10, 20, np_rng(0, "test-drift"))
    result = evaluate_stream(lambda: DriftMonitor(detectors[name]), stream, 10)
    assert result["detection_delay"] is not None and result["detection_delay"] <= 3


def test_ks_p_value_drops_below_alpha_after_rotation(rotation, detectors):
    _, pre, post = rotation
    ae = detectors["autoencoder"]
    stream = make_stream(pre, post, BATCH, 10, 14, np_rng(0, "test-ks"))
    monitor = DriftMonitor(ae, math.inf, TwoSampleDrift(ae.reference_scores, window=128, alpha=0.01))
    p = [monitor.update(b)["p_value"] for b in stream]
    assert min(p[10:]) < 0.01
    assert monitor.alarm_at is not None and 10 <= monitor.alarm_at <= 13  # the KS alone decides


def test_evaluate_detectors_on_writers_rotation(rotation):
    result = evaluate_detectors(*rotation, n_batches=20, change_at=10, null_batches=200, ae_epochs=20, seed=0)
    assert set(result) == {"autoencoder", "isolation_forest", "ks_autoencoder"}
    json.dumps(result)  # what `fedmeta drift eval --json` prints
    for name, r in result.items():
        assert r["detection_delay"] is not None and r["detection_delay"] <= 3, name
        assert r["false_alarm_rate"] <= 0.15, name  # on the drift-free stream
        assert 0 <= r["false_alarms_before_change"] <= 10, name


@pytest.mark.parametrize("kind", ["rotation", "new_writers", "label_shift", "joiners"])
def test_writers_drift_data_shapes(kind):
    reference, pre, post = writers_drift_data(3, kind, n_reference=200, n_pre=100, n_post=100)
    assert reference.shape == (200, 64) and pre.shape == (100, 64) and post.shape == (100, 64)
    for x in (reference, pre, post):
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert not np.array_equal(post, pre)


def test_rotate_images_quarter_turn_and_full_turn():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 1, 8, 8)
    quarter = rotate_images(x, 90.0)
    assert any(torch.equal(quarter, torch.rot90(x, k, dims=(-2, -1))) for k in (1, -1))
    torch.testing.assert_close(rotate_images(x, 360.0), x)


# ---------------------------------------------------------------- evaluation bookkeeping
def constant_stream(signals: list[float]) -> list[np.ndarray]:
    return [np.full((4, 2), s) for s in signals]


def test_evaluate_stream_on_a_hand_made_alarm_sequence():
    signals = [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.1]  # change at 5: alarms at 0, 2 | 7, 8
    det = FirstColumn().fit(np.zeros((1, 2)))

    def factory() -> DriftMonitor:
        return DriftMonitor(det, 0.5)

    stream = constant_stream(signals)
    assert evaluate_stream(factory, stream, 5) == {
        "detection_delay": 2,
        "false_alarms": 2,
        "false_alarm_rate": 0.4,
    }
    assert evaluate_stream(factory, stream, 0) == {
        "detection_delay": 0,
        "false_alarms": 0,
        "false_alarm_rate": None,
    }
    assert evaluate_stream(factory, stream, 10) == {
        "detection_delay": None,
        "false_alarms": 4,
        "false_alarm_rate": 0.4,
    }


def test_monitor_alarm_is_sticky_until_reset():
    det = FirstColumn().fit(np.zeros((1, 2)))
    monitor = DriftMonitor(det, 0.5)
    outs = [monitor.update(b) for b in constant_stream([0.1, 0.9, 0.1])]
    assert [o["alarm"] for o in outs] == [False, True, False]  # each batch's own alarm
    assert monitor.alarm_at == 1 and monitor.alarmed  # the first one, kept
    assert monitor.signals == pytest.approx([0.1, 0.9, 0.1])
    assert all(o["p_value"] is None for o in outs)
    monitor.reset()
    assert monitor.alarm_at is None and monitor.signals == []


def test_make_stream_switches_pools_at_the_change():
    pre, post = np.zeros((10, 3)), np.ones((10, 3))
    stream = make_stream(pre, post, 4, 2, 5, np_rng(0, "s"))
    assert [float(b.mean()) for b in stream] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(b.shape == (4, 3) for b in stream)


def test_two_sample_window_keeps_the_last_scores():
    ks = TwoSampleDrift(np.linspace(0, 1, 500), window=10, alpha=0.05)
    p, alarm = ks.update(np.linspace(0, 1, 10))
    assert p > 0.5 and not alarm
    p, alarm = ks.update(np.full(10, 5.0))  # the window now holds only these
    assert p < 0.05 and alarm


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_bad_false_alarm_rate(rate):
    det = FirstColumn().fit(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="false_alarm_rate"):
        det.calibrate([np.zeros((3, 2))], rate)
    with pytest.raises(ValueError, match="false_alarm_rate"):
        FirstColumn().fit_calibrated(np.zeros((20, 2)), rate, 4, np_rng(0, "c"))
    with pytest.raises(ValueError, match="false_alarm_rate"):
        threshold_from_signals([1.0, 2.0], rate)


def test_bad_batches_and_shapes():
    det = FirstColumn().fit(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="batch: empty"):
        det.score(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="batch: expected 3 features"):
        det.score(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="batch"):
        det.signal(np.zeros(3))
    with pytest.raises(ValueError, match="batch: contains NaN"):
        det.score(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="reference: empty"):
        FirstColumn().fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="reference_batches"):
        det.calibrate([], 0.05)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="alpha"):
        TwoSampleDrift(np.ones(5), 10, alpha=1.0)
    with pytest.raises(ValueError, match="window"):
        TwoSampleDrift(np.ones(5), 0)
    with pytest.raises(ValueError, match="reference_scores"):
        TwoSampleDrift(np.ones(0), 10)
    with pytest.raises(ValueError, match="change_at"):
        make_stream(np.zeros((8, 2)), np.zeros((8, 2)), 4, 6, 5, np_rng(0, "s"))
    with pytest.raises(ValueError, match="post"):
        make_stream(np.zeros((8, 2)), np.zeros((3, 2)), 4, 2, 5, np_rng(0, "s"))
    with pytest.raises(ValueError, match="change_at"):
        evaluate_stream(lambda: None, [np.zeros((2, 2))], 2)
    with pytest.raises(ValueError, match="threshold"):
        DriftMonitor(FirstColumn().fit(np.zeros((1, 2))))
    with pytest.raises(ValueError, match="kind"):
        writers_drift_data(0, "upside_down")
    with pytest.raises(ValueError, match="holdout"):
        FirstColumn().fit_calibrated(np.zeros((20, 2)), 0.05, 4, np_rng(0, "c"), holdout=1.0)
    with pytest.raises(RuntimeError, match="fit"):
        IsolationForestDetector().score(np.zeros((2, 2)))


def test_false_alarm_summary_intervals():
    """The across-seed t interval and the pooled exact binomial interval, and the target check."""
    from fedmeta.sim.detector_eval import false_alarm_summary

    s = false_alarm_summary([0.04, 0.06, 0.05, 0.05], alarms=200, batches=4000, target=0.05)
    assert s["mean"] == pytest.approx(0.05) and s["within_target"]
    lo, hi = s["interval"]
    assert lo < 0.05 < hi and hi - lo == pytest.approx(2 * 3.182 * 0.00816 / 2, rel=1e-3)
    assert s["pooled"] == 0.05 and s["pooled_interval"][0] < 0.05 < s["pooled_interval"][1]
    off = false_alarm_summary([0.09, 0.10, 0.095], alarms=285, batches=3000, target=0.05)
    assert not off["within_target"] and off["interval"][0] > 0.05 and off["exceeds_target"]
    assert not s["exceeds_target"]
    one = false_alarm_summary([0.07], alarms=70, batches=1000, target=0.05)
    assert one["interval"] is None and not one["within_target"]
