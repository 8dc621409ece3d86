from mfbatch.cli import app

app(prog_name="mfbatch")
