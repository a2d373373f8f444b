"""The yardstick: a bare FastAPI endpoint on the same machine, served the same way as the services."""

from fastapi import FastAPI

app = FastAPI()


@app.post("/bare")
async def bare(body: dict) -> dict:
    return {"ok": True, "echo": len(body)}


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bare_app", description=__doc__)
    parser.add_argument("port", type=int, help="port on 127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning", access_log=False)
