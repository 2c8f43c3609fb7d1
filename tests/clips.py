"""Video clips written for the tests with PyAV (the [video] extra): the one writer the test
modules share."""

from __future__ import annotations


def write_clip(path, frames, rate: int, codec: str = "ffv1", fmt: str | None = None) -> None:
    """``frames`` (H x W x 3 uint8 each: a list or a T x H x W x 3 array) as a video file, or
    as a file object with ``fmt``: FFV1 (lossless) or ``codec`` in yuv420p (e.g. mpeg4)."""
    import av

    with av.open(path if fmt else str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
