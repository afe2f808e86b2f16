"""Session format 2: standard MCAP tools read the viewer channels without iwm-bus.

Sessions are written with the real ``SessionWriter`` (and one with the format 1 code, kept
below as bytes), then read back in a separate Python that imports only ``mcap``,
``mcap_protobuf``, ``foxglove_schemas_protobuf``, ``json``, ``PIL`` and ``numpy`` (what a
viewer has): every ``foxglove.CompressedImage`` must decode to the recorded pixels exactly and
every JSON number must equal what was written. ``iwm-session convert`` upgrades format 1.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from iwm_bus.bus.topics import ACTION, MRR, SURPRISE
from iwm_bus.bus.wire import make_action
from iwm_bus.session import SessionReader, SessionWriter, convert
from iwm_bus.session.cli import main as cli

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
T0 = 5_000_000_000
DT = 20_000_000

# what a viewer does: no iwm_bus anywhere in this process
_CHECK = r"""
import base64, io, json, sys
import numpy as np
from PIL import Image
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory
from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage

def check(path):
    out = {"images": [], "json": {}, "encodings": {}}
    factory = DecoderFactory()
    with open(path, "rb") as f:
        reader = make_reader(f)
        for schema, channel, msg in reader.iter_messages(log_time_order=True):
            out["encodings"][channel.topic] = [channel.message_encoding,
                                               schema.encoding if schema else None]
            if channel.message_encoding == "protobuf":
                assert schema.name == "foxglove.CompressedImage", schema.name
                decoded = factory.decoder_for(channel.message_encoding, schema)(msg.data)
                assert type(decoded).DESCRIPTOR.full_name == "foxglove.CompressedImage"
                image = CompressedImage.FromString(msg.data)  # the published class agrees
                assert image == CompressedImage.FromString(decoded.SerializeToString())
                px = np.array(Image.open(io.BytesIO(image.data)))
                out["images"].append({
                    "topic": channel.topic, "log_time": msg.log_time, "format": image.format,
                    "stamp": image.timestamp.ToNanoseconds(), "shape": list(px.shape),
                    "pixels": base64.b64encode(px.tobytes()).decode()})
            elif channel.message_encoding == "json":
                assert schema.encoding == "jsonschema"
                props = json.loads(schema.data)["properties"]
                body = json.loads(msg.data)
                assert set(body) <= set(props), (set(body) - set(props))
                out["json"].setdefault(channel.topic, []).append(body)
    return out

assert "iwm_bus" not in sys.modules
result = {p: check(p) for p in sys.argv[1:]}
assert "iwm_bus" not in sys.modules, "the check imported iwm_bus"
print(json.dumps(result))
"""


def viewer_read(*paths: Path) -> list[dict]:
    """Each file as a viewer sees it (see ``_CHECK``), in a Python without iwm_bus."""
    proc = subprocess.run([sys.executable, "-c", _CHECK, *map(str, paths)], cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    return [got[str(p)] for p in paths]


def pixels(image: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(image["pixels"]), np.uint8).reshape(image["shape"])


def frame_at(i: int, c: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:12, 0:16]
    img = np.stack([(x * 16 + i * 9) % 256, (y * 21 + i) % 256, np.full_like(x, i * 37 % 256),
                    np.full_like(x, 200 - i)], -1)[:, :, :c].astype(np.uint8)
    img[3 + i % 5, 2:9] = 255 - i
    return img


def write_v2(path: Path, n: int = 6, c: int = 3, **options) -> dict:
    """A session with the real writer; returns what was written, per viewer series."""
    z_values = [None, None, 0.75, -1.25, 3.5e-3, 2.0]
    written: dict = {"surprise": [], "mrr": [], "action": []}
    with SessionWriter(path, metadata={"source": {"spec": "test"}}, **options) as w:
        for i in range(n):
            t = T0 + i * DT
            w.write_frame(i, t, frame_at(i, c), action=make_action(action_id=i % 4) if i else None)
            s = None if i == 0 else float(np.sin(i) + 1.5)
            w.write_event(SURPRISE, t, {"seq": i, "t_capture_ns": t, "t_publish_ns": t + 9,
                                        "surprise": s, "surprise_z": z_values[i % 6],
                                        "pred_seq": i - 1 if i else None, "action": None,
                                        "variant": "core"})
            w.write_event(MRR, t, {"seq": i, "t_capture_ns": t, "t_publish_ns": t + 9,
                                   "rr": 1 / (i + 1), "mrr": 0.5 + i / 16, "k": 8,
                                   "variant": "core"})
            vec = np.array([0.5 * i, -1.0], np.float32)
            w.write_action(None, {"seq": 100 + i, "t_ns": t + 1000, "frame_seq": i,
                                  "vector": vec, "action_id": (i + 1) % 4})
            written["surprise"].append((t, i, s, z_values[i % 6]))
            written["mrr"].append((t, i, 1 / (i + 1), 0.5 + i / 16))
            written["action"].append((t + 1000, 100 + i, (i + 1) % 4, [0.5 * i, -1.0]))
    return written


def assert_viewer_matches(seen: dict, frames: list[np.ndarray], times: list[int],
                          written: dict | None = None) -> None:
    images = seen["images"]
    assert [im["topic"] for im in images] == ["/viewer/frames"] * len(frames)
    assert [im["log_time"] for im in images] == times
    assert [im["stamp"] for im in images] == times
    for im, frame in zip(images, frames, strict=True):
        px = pixels(im)
        np.testing.assert_array_equal(px.reshape(frame.shape), frame)
        assert px.size == frame.size
    assert seen["encodings"]["/viewer/frames"] == ["protobuf", "protobuf"]
    assert seen["encodings"]["frames"] == ["msgpack", "jsonschema"]
    if written is None:
        return
    for name in ("surprise", "mrr", "action"):
        assert seen["encodings"][f"/viewer/{name}"] == ["json", "jsonschema"]
    surprise = [(m["t_ns"], m["seq"], m["surprise"], m["surprise_z"])
                for m in seen["json"]["/viewer/surprise"]]
    assert surprise == written["surprise"]
    last, t_last = seen["json"]["/viewer/surprise"][-1], written["surprise"][-1][0]
    assert last["timestamp"] == {"sec": t_last // 10**9, "nsec": t_last % 10**9}
    mrr = [(m["t_ns"], m["seq"], m["rr"], m["mrr"]) for m in seen["json"]["/viewer/mrr"]]
    assert mrr == written["mrr"]
    assert all(m["k"] == 8 for m in seen["json"]["/viewer/mrr"])
    acts = [(m["t_ns"], m["seq"], m["action_id"], m["vector"])
            for m in seen["json"]["/viewer/action"]]
    assert acts == written["action"]


# ---------------------------------------------------------------- format 2


def test_viewer_reads_frames_and_numbers_exactly(tmp_path: Path) -> None:
    png = tmp_path / "png.mcap"
    written = write_v2(png)
    raw4 = tmp_path / "raw4.mcap"
    write_v2(raw4, c=4, frame_encoding="zstd-raw")  # re-encoded as PNG for viewers
    gray = tmp_path / "gray.mcap"
    write_v2(gray, c=1, frame_encoding="zstd-raw", chunk_size=4096)
    jpeg = tmp_path / "jpeg.mcap"
    write_v2(jpeg, frame_encoding="jpeg")
    seen_png, seen_raw4, seen_gray, seen_jpeg = viewer_read(png, raw4, gray, jpeg)
    times = [T0 + i * DT for i in range(6)]
    assert_viewer_matches(seen_png, [frame_at(i) for i in range(6)], times, written)
    assert_viewer_matches(seen_raw4, [frame_at(i, 4) for i in range(6)], times, written)
    assert_viewer_matches(seen_gray, [frame_at(i, 1) for i in range(6)], times)
    assert {im["format"] for im in seen_png["images"] + seen_raw4["images"]} == {"png"}
    # jpeg stays jpeg: the viewer shows exactly what the session decodes to
    assert_viewer_matches(seen_jpeg, [f.pixels for f in SessionReader(jpeg).frames()], times)
    assert {im["format"] for im in seen_jpeg["images"]} == {"jpeg"}


def test_readers_skip_the_viewer_channels(tmp_path: Path) -> None:
    path = tmp_path / "s.mcap"
    write_v2(path)
    r = SessionReader(path)
    assert r.format_version == 2 and r.metadata["format_version"] == 2
    assert r.topics == {"frames": 6, SURPRISE: 6, MRR: 6, ACTION: 6}
    assert r.viewer_topics == {"/viewer/frames": 6, "/viewer/surprise": 6, "/viewer/mrr": 6,
                               "/viewer/action": 6}
    assert len(list(r.messages())) == 24
    assert [f.seq for f in r.frames()] == list(range(6))
    off = tmp_path / "off.mcap"
    write_v2(off, viewer=False)
    assert SessionReader(off).viewer_topics == {}


# ---------------------------------------------------------------- format 1

# a session written by the format 1 writer (iwm-bus before format 2; kept as bytes so this
# stays a file written the old way): 3 frames 6x8 png (V1_FRAME), an agent.action, an
# iwm.surprise and an iwm.mrr each; zlib + base64
V1_SESSION = (
    "eNrNWHtUE2cWT0IIkVcAAR+AwKgtr2BCQhKQFXlVVFYUFdwjGIdkIAPJJM5MiAiswCKCp55Cu1YUTtVVK2jxVXFb"
    "cX2t4qOgUZGHdn2iR4vKCrXHYrU7k8ykCRU5e87+sckh8829v9+939w78/3mo/qPCXELBS6OTF+G+eNA/MEGDT9b"
    "j7n8NpwhCBeGC5wfMc0gntkjJzzhGIRhsBa5Qrg4hDlHi2pA3J0YARSXTyEAV4tbXgChpIkMJ3QjfjBtDm4AUYh2"
    "kLMATDkBJ2KoQCEQh5RyPa4ASE+EIELCFwr5IsESoThaLI2OjAyXCkQigSxUIIgWCACeNQmBV8sRbDyZSxolEUQK"
    "BNJIEi2SyiQCexKp1iryvcjABlCtDgjCYQ0UTv4QtGDztFGQOIMQhVYJI7kkB9AhuQA5Ta0OJyaMNRLDIsAWB0QH"
    "mGBhAUCeDsqVr9KDahgvJMxRgjCTS66GCiA1YRAS52swXGkxiAiDQqVH8uUYvAYiEQKxLFIq+c0MKbSIEiM94QKL"
    "VaHV6FCq3tHmkGT6HKwQURCGHFCNQSUcU8X1qAKaZJo1poNIJ0CAcBWEw4po2WoJUMJRsKmbYtA+hGzV41RVGHlM"
    "dzGbtw/6C0kImUVKYYNaZrxZme6sCWR8/sOWuXcPyxQr//LnmGVdn9w6V/WsQFY5b3JLp/Pka4cbC4zPu4+9Tdzw"
    "4wcg3/F1RX5rgvBbWevgkvmd50M9Ulua1m93eBTLuMf1iks9msIsZlQyKhjyC/EhwoBN3o83n3vlc3rV+oyjc17c"
    "vPrlhq7jtSW9nkhz3Nmcf8zOa+qrbq7SLivvyTu+9YY6qfXFuj9lYcn8pbdav478To0Ybx+ZNz43I63p/mCeRj+9"
    "Zcnrm4buhm03i3f5xW2cXzJ0clr7dNXXFz+Vt9XM3tbsFdz666IFqXDWkUniKzKWw4Etp8qSlgzt4IzzDmXDHEde"
    "moDzdqAxsWdtuHgw9se18fPssYiQqOqAhISdhxb1qwO9p/IT1T/0vH3Q1Nfol9Piyq11858WcgAI9hqYU5nrcb9/"
    "mDc8Ay3bFpw3GFv9NhZdM3ySqZLU93Z295+doCuUvrrXx7uTXtLbg2SW33GV3up49OypMcUpZkqMZ1pBq2HP8Zdt"
    "dzrkYUd6Ow8e5g+e3XniQBd8sxgZsmu5Ia3/udPu9pvUq+teHcsTf1leaXh5f0ZxVXFQRkzVq/bVbMnR+4bnmUkP"
    "m/l1V9LWG9ad+Rl9i34b55PQLJFoOS0umhOHWczLbwxPEH7MwYCzyRePn2pEGlizfJYpZTfHiz7/JlCceb6joUfk"
    "e34HawN3k92bvy4si81u89j84NpOcZsuVlW5iDfcP/vFroZ0VYRv3JQzD1SbOlaEPFtZfm9j6cLNfnPulnbVfZwy"
    "r8nHSbxjtufc5Khm47IrVZsWX/r1+r/jw712XS5aGBN1oNTPTTiEPmf3pXzqi9dcTHrUMJcT9RnDda+xN7M8cgKz"
    "9EZjYNxHHcaUuJB1kOt2lnvg5CGP0oi5NQ8FW0Vtbme41ckCoDa5Zpc4WMypUN51875VF7krnXtp3Am203HeiZjK"
    "Rllf5ExWwdOZXS882Ev/vgKpKTpybFHXtdm192qaEx+U4jUdGX3IGWCbW9CCMmFJwLNlPnCe6zyndt/dhrTPuGFP"
    "fEvD8i6EbhDJ/OdfUOuz/Mo4/dwzcYtj9sRfcA9N9N6UH+Rx7ouG8Yn8oMLUtcWHtjAcAlcCFUlGI2umJh1JWuBy"
    "yVs3XNf1tHz/pNL+w+3p7RN506JWjFudMAXQfSNZ/qY9+v6jnojTRV8VvgQ/GfAX5R0F9oVVHji6fuC7fN5ukbvL"
    "Ly8kmYPjfnK/lNVDXNed7n3K6wOqgbb46vDbFYlpiacyvb+fUj+4eHVInZ9LcuWWWcpD4Y0dZX8r+vinpMu3uiuj"
    "dBe+wk5uKeU21W7MiXi9fWvlcFPtQaA77l/CJw/3xXf+c9aEq417b096HBy1+5jxCxxkVGWlnJre0nS3vWfi1ORZ"
    "gNT+4srejIpF/mUzCqOndXXWn06XTdvjsMeVGTPUNKVrIMTn+qSTV3fWeH4fNBEJAD+IqLuX8aFHWV/Ck6D9ogyO"
    "g4RaapgMgdWKY6QEh+EvDSWHT7nUeYp5JQp0olSLprNM9McvzXRHalF6DJjpB8dR59RC9nAk3c4m+0cc2+xcR9vs"
    "f3AeQWfb0HO4tvT6EXQjRXfWUfbxv5fVcAhRLmVQ0kqKC0YyRWRkYoyBuRDGIoUtwtGsY9hYKhkhkQjFtErS67vp"
    "0quZdAc8reZhSspHCbFBlWSOPIwQO4UK0oBZTFI7cBhXk/IEjJy4iUhqD16oMwG02XmQAictOlSrg1Achkj1IuQH"
    "WmU60kAYwaFcCAVKSDIhwaM6rXS2iDjRa4jBclpxSVHio6CBVl8gi6SoIDhXhY8a0QArcdWoXoUKRBBIjdnkI5Sb"
    "0GqxKboSxEGTk5BmHELwJKsXgWwYAdFCUxxQgZv12ZJmuVV1EL1aTUy2pMRuJpO+qV2tOmJm2/bC6929MMAoROH/"
    "q04oIUyBwjpqlmQNbJsxit/89jN6kFgTqoDIrUXfBQFRFCyMtSqRHFa+N5T5JeZdEAxHCQhRw3om/WS7WT9delSH"
    "whhkW0XsPVWkGf+bOipAHa5HoTHqict1+mw1jKnGwFnm9g4McZdmQ2isDU6+Ziwk8Q6pHLORVrfxyEaaPFS7QRQG"
    "EXyUJpl6lM6kl08nqx5pUNS2PaL3tIcA/z92BkXHqrRmbEj++zKMXV52pEVamVY6Qu5dNFiuDlTkTzTVnsHIhxGl"
    "Mw2g1nwLm0V8SSchOQhOLSpWMTysYpBJzAC21CKsdiY20TTLo2TF9rRik9pGQ9h8i7Ky6a0p2WsrKs+KakeaUdQp"
    "nWI5W7HpqyDr8PstTZDJbmdB2VnNm45Bj7hqxrv3Rb4ss1lN74VMQas4dNDzHDoox4EOmkSNfrGksd1P0Xstl6kU"
    "gK7IwOh7cZcPKUwFFbzw/S8Yru701TpSryy99uajxcN+QM1jkDHC43TD1TyQj/RwxTzzQD/S49jEY9h8LB4X2pNJ"
    "t8KT5lBTs3czH6cb9+6vpv578R/ZeP/c"
)


def v1_frame(i: int) -> np.ndarray:
    y, x = np.mgrid[0:6, 0:8]
    return np.stack([(x * 30 + i * 7) % 256, (y * 40) % 256, np.full_like(x, i * 50)],
                    -1).astype(np.uint8)


V1_WRITTEN = {
    "surprise": [(T0 + i * DT, i, None if i == 0 else 0.25 * i, None) for i in range(3)],
    "mrr": [(T0 + i * DT, i, 0.5, 0.5 + i / 8) for i in range(3)],
    "action": [(T0 + i * DT + 1000, i, i + 1, None) for i in range(3)],
}


@pytest.fixture
def v1_file(tmp_path: Path) -> Path:
    path = tmp_path / "v1.mcap"
    path.write_bytes(zlib.decompress(base64.b64decode("".join(V1_SESSION))))
    return path


def test_format_1_file_still_reads(v1_file: Path) -> None:
    r = SessionReader(v1_file)
    assert r.format_version == 1 and r.viewer_topics == {} and not r.recovered
    assert r.topics == {"frames": 3, ACTION: 3, SURPRISE: 3, MRR: 3}
    frames = list(r.frames())
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.pixels, v1_frame(i))
    assert [f.action for f in frames] == [None, {"action_id": 1}, {"action_id": 2}]
    assert [m["surprise"] for m in r.events(SURPRISE)] == [None, 0.25, 0.5]
    assert [(t.frame.seq, t.action) for t in r.transitions()] == [(0, {"action_id": 1}),
                                                                 (1, {"action_id": 2})]
    from train.data import FrameStore

    store = FrameStore.from_sessions([v1_file], img_size=8, cond_dim=4)
    assert store.action_id.tolist() == [-1, 1, 2] and store.linked.tolist() == [False, True,
                                                                                  True]


def test_convert_format_1(v1_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "v2.mcap"
    before = v1_file.read_bytes()
    assert cli(["convert", str(v1_file), str(out)]) == 0
    assert "format 1 -> 2: 12 messages (3 frames) copied, 12 viewer messages" in \
        capsys.readouterr().out
    assert v1_file.read_bytes() == before  # the source is left alone
    (seen,) = viewer_read(out)
    assert_viewer_matches(seen, [v1_frame(i) for i in range(3)],
                          [T0 + i * DT for i in range(3)], V1_WRITTEN)
    old, new = SessionReader(v1_file), SessionReader(out)
    assert new.format_version == 2 and new.topics == old.topics
    assert new.metadata["source"] == {"spec": "synthetic:8x6"}
    assert new.metadata["created_utc"] == old.metadata["created_utc"]
    assert [(t, m.data, m.log_time, m.publish_time, m.sequence)
            for t, m in new.raw_messages()] == [(t, m.data, m.log_time, m.publish_time,
                                                 m.sequence) for t, m in old.raw_messages()]
    from train.data import FrameStore

    a = FrameStore.from_sessions([v1_file], img_size=8, cond_dim=4)
    b = FrameStore.from_sessions([out], img_size=8, cond_dim=4)
    assert a.frames.equal(b.frames) and a.action_id.equal(b.action_id)
    # in place, then nothing left to do
    assert cli(["convert", str(v1_file)]) == 0
    assert SessionReader(v1_file).format_version == 2
    assert cli(["convert", str(v1_file)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.mcap", "v2.mcap"]


def test_convert_keeps_the_readable_part_and_refuses_bad_files(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cut = tmp_path / "cut.mcap"
    w = SessionWriter(cut, viewer=False)  # a killed recorder: chunks on disk, no footer
    for i in range(10):
        w.write_frame(i, T0 + i * DT, frame_at(i))
        w.flush()
    w._file.close()
    res = convert(cut, tmp_path / "fixed.mcap")
    assert res.needed and res.problem and "no footer" in res.problem
    assert res.frames == 10 and res.viewer_messages == 10
    (seen,) = viewer_read(res.path)
    assert_viewer_matches(seen, [frame_at(i) for i in range(10)],
                          [T0 + i * DT for i in range(10)])
    bad = tmp_path / "bad.mcap"
    bad.write_bytes(b"not a session at all")
    assert cli(["convert", str(bad), str(tmp_path / "never.mcap")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.mcap: not an MCAP session file" in err[0]
    assert not (tmp_path / "never.mcap").exists()
    assert bad.read_bytes() == b"not a session at all"
