"""`python -m engine show` prints and draws a pattern's mask; `python -m engine build` builds the
CPU span kernel (`make install` runs it)."""

from __future__ import annotations

import json

import pytest

from engine.__main__ import main
from engine.kernels import span_kernel


def test_show_prints_the_fixed_pattern(capsys):
    main(["show", json.dumps({"type": "fixed", "block": 4, "summary": 1}), "--n", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:8] == ["#.......", "##......", "###.....", "####....", "...##...", "...###..", "...####.", "...#####"]
    assert lines[8] == "attended pairs: 24 of 64"


def test_show_per_head_prints_each_head(capsys):
    pattern = {"type": "per_head", "patterns": [{"type": "sliding_window", "window": 2}, {"type": "strided", "stride": 2}]}
    main(["show", json.dumps(pattern), "--n", "4", "--heads", "2"])
    out = capsys.readouterr().out
    assert "head 0:\n#...\n##..\n.##.\n..##\nhead 1:\n#...\n.#..\n#.#.\n.#.#\n" in out


def test_show_png_writes_an_image(tmp_path):
    target = tmp_path / "mask.png"
    main(["show", '{"type": "strided", "stride": 4}', "--n", "32", "--png", str(target)])
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, shown", [
    (["show", "{type: fixed}"], "pattern: Invalid JSON"),
    (["show", '{"type": "sliding_window", "window": 4}', "--n", "-1"], "argument --n: -1 is not in 1..2048"),
    (["demo", "--n", "1000000000"], "argument --n: 1000000000 is not in"),
    (["show", '{"type": "sliding_window", "window": 4}', "--png", "/nonexistent/dir/x.png"], "No such file"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, shown):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and shown in capsys.readouterr().err


def test_build_builds_the_span_kernel_or_says_it_cannot(capsys, monkeypatch, tmp_path):
    """Into ATTN_KERNEL_CACHE where a compiler builds it; without one it says so and exits 0 (make
    install runs it on machines without a compiler too)."""
    monkeypatch.setenv("ATTN_KERNEL_CACHE", str(tmp_path / "cache"))
    span_kernel.library.cache_clear()
    try:
        if span_kernel.compiler():
            main(["build"])
            products = span_kernel.bfloat16_products()
            assert products in span_kernel.BFLOAT16_PRODUCTS
            assert capsys.readouterr().out == (f"the span kernel is built, kept in {tmp_path / 'cache'}; "
                                               f"bfloat16's products: {products}\n")
            assert len(list((tmp_path / "cache").glob("span_attention-*.so"))) == 1
            span_kernel.library.cache_clear()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        main(["build"])
        assert capsys.readouterr().out.startswith("the span kernel is not built (no C++ compiler")
    finally:
        span_kernel.library.cache_clear()
