"""Speech-to-text example service: a tiny model built in code, no weights.

POST /transcribe takes an audio file (mp3, ogg, wav, flac, ...), decoded by
ffmpeg, from the service's Debian packages (`system_packages: [ffmpeg]`), to
16 kHz mono float samples; headerless 16-bit PCM at 16 kHz, the original
input, is still accepted as it is.
"""

import subprocess

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, UploadFile

from contract import Contract

contract = Contract("stt")
app = FastAPI(title="stt", description="Tiny speech-to-text model: audio (mp3, ogg, wav, raw 16-bit PCM) in, "
              "tokens out.")
contract.install(app)
model = None


class TinyRecognizer(torch.nn.Module):
    """Waveform -> framed features -> GRU -> per-frame character logits."""

    def __init__(self, frame=160, hidden=64, vocab=28):
        super().__init__()
        self.frame = frame
        self.proj = torch.nn.Linear(frame, hidden)
        self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, wave):
        n = wave.shape[-1] // self.frame * self.frame
        frames = wave[..., :n].reshape(wave.shape[0], -1, self.frame)
        out, _ = self.rnn(torch.relu(self.proj(frames)))
        return self.head(out)


def _loaded(m):
    global model
    model = m


contract.load_torch_model(TinyRecognizer, _loaded)
ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


SAMPLE_RATE = 16000
# Leading bytes of the containers ffmpeg is asked to read; anything else is taken as raw PCM.
SIGNATURES = (b"OggS", b"RIFF", b"ID3", b"fLaC", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\x1aE\xdf\xa3")


def is_container(data: bytes) -> bool:
    return data.startswith(SIGNATURES) or data[4:8] == b"ftyp"  # ftyp: mp4/m4a


def decode(data: bytes) -> np.ndarray:
    """An audio file as 16 kHz mono float32 samples, through ffmpeg (stdin to stdout, nothing on disk)."""
    try:
        proc = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-f", "f32le",
                               "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"], input=data, capture_output=True,
                              timeout=120)
    except FileNotFoundError:
        raise HTTPException(500, "ffmpeg is not installed in this image (system_packages: [ffmpeg])") from None
    except subprocess.TimeoutExpired:
        raise HTTPException(413, "decoding took longer than 120 s") from None
    if proc.returncode != 0:
        raise HTTPException(400, "ffmpeg cannot decode the upload: "
                            + proc.stderr.decode(errors="replace").strip()[-300:])
    return np.frombuffer(proc.stdout[:len(proc.stdout) // 4 * 4], dtype=np.float32)


@app.post("/transcribe")
async def transcribe(file: UploadFile):
    if model is None:
        raise HTTPException(503, "model is loading")
    data = await file.read()
    decoded = is_container(data)
    if decoded:
        pcm = decode(data)
    else:
        pcm = np.frombuffer(data[:len(data) // 2 * 2], dtype=np.int16).astype(np.float32) / 32768.0
    if pcm.size < model.frame:
        raise HTTPException(400, "audio shorter than one frame (160 samples at 16 kHz)")
    wave = torch.from_numpy(pcm).unsqueeze(0).to(contract.device())
    with torch.inference_mode():
        ids = model(wave).argmax(-1)[0].tolist()
    text = "".join(ALPHABET[i] for i in ids)
    return {"text": text, "frames": len(ids), "seconds": round(pcm.size / SAMPLE_RATE, 3),
            "decoded_by": "ffmpeg" if decoded else "raw pcm"}
