"""Speech-to-text example service: a tiny model built in code, no weights."""

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, UploadFile

from contract import Contract

contract = Contract("stt")
app = FastAPI(title="stt", description="Tiny speech-to-text model: 16-bit PCM in, tokens out.")
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


@app.post("/transcribe")
async def transcribe(file: UploadFile):
    if model is None:
        raise HTTPException(503, "model is loading")
    pcm = np.frombuffer(await file.read(), dtype=np.int16).astype(np.float32) / 32768.0
    if pcm.size < model.frame:
        raise HTTPException(400, "audio shorter than one frame (160 samples of 16-bit PCM)")
    wave = torch.from_numpy(pcm).unsqueeze(0).to(contract.device())
    with torch.inference_mode():
        ids = model(wave).argmax(-1)[0].tolist()
    text = "".join(ALPHABET[i] for i in ids)
    return {"text": text, "frames": len(ids)}
