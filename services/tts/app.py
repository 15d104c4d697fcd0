"""Text-to-speech example service: a tiny model built in code, no weights."""

import io

import numpy as np
import soundfile
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel

from contract import Contract

SAMPLE_RATE = 16000
contract = Contract("tts")
app = FastAPI(title="tts", description="Tiny text-to-speech model: text in, WAV out.")
contract.install(app)
model = None


class TinyVocoder(torch.nn.Module):
    """Characters -> embeddings -> 1-D convolutions -> waveform samples."""

    def __init__(self, vocab=256, dim=32, hop=160):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.conv = torch.nn.Conv1d(dim, dim, 5, padding=2)
        self.out = torch.nn.ConvTranspose1d(dim, 1, hop, stride=hop)

    def forward(self, codes):
        x = self.embed(codes).transpose(1, 2)
        return torch.tanh(self.out(torch.relu(self.conv(x)))).squeeze(1)


def _loaded(m):
    global model
    model = m


contract.load_torch_model(TinyVocoder, _loaded)


class Text(BaseModel):
    text: str


@app.post("/synthesize")
def synthesize(req: Text):
    if model is None:
        raise HTTPException(503, "model is loading")
    codes = torch.tensor([list(req.text.encode()[:512]) or [0]], device=contract.device())
    with torch.inference_mode():
        wave = model(codes)[0].float().cpu().numpy()
    buf = io.BytesIO()
    soundfile.write(buf, np.asarray(wave), SAMPLE_RATE, format="WAV")
    return Response(buf.getvalue(), media_type="audio/wav")
