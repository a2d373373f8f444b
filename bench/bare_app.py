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
    import sys

    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
