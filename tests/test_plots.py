"""Charts are optional: without matplotlib a chart is skipped with one line, never a failure."""

import builtins

from compress.workflow import plots


def test_without_matplotlib_a_chart_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rows = [{"layer": "fc", "drop": 0.5, "sqnr_db": 30.0}]
    assert plots.sensitivity_chart(rows, tmp_path / "s.png", "t") is None
    assert not (tmp_path / "s.png").exists()
    assert capsys.readouterr().err.strip() == (
        "matplotlib is not installed: no chart (pip install 'compress[plot]')"
    )


def test_with_matplotlib_the_chart_is_a_png(tmp_path):
    rows = [{"layer": "fc", "drop": 0.5, "sqnr_db": 30.0}]
    path = plots.sensitivity_chart(rows, tmp_path / "s.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_labels_do_not_overlap_where_runs_crowd():
    """Runs of one baseline crowd near it (results/pareto.png): each label finds its own place."""
    plt = plots._pyplot()
    fig, axis = plt.subplots(figsize=(7.5, 5))
    points = [(0.60 + 0.002 * i, 93.7 - 0.01 * i) for i in range(6)] + [(0.1, 89.0), (9.0, 95.0)]
    axis.scatter(*zip(*points, strict=True))
    axis.set_xscale("log")
    plots._label_apart(fig, axis, [(f"resnet_run_{i}", xy) for i, xy in enumerate(points)])
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axis.texts]
    plt.close(fig)
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
