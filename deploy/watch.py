"""Print the events arriving on Kafka topics, one line each: `python -m deploy.watch [topics...]`.

    python -m deploy.watch                      # every billing.* topic, from now on
    python -m deploy.watch billing.invoice --from-beginning
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from aiokafka import AIOKafkaConsumer

from contracts import topics


async def watch(bootstrap: str, names: list[str], from_beginning: bool) -> None:
    consumer = AIOKafkaConsumer(*names, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    print(f"watching {', '.join(names)} on {bootstrap} (Ctrl-C to stop)", flush=True)
    try:
        async for record in consumer:
            try:
                event = json.loads(record.value)
            except ValueError:
                print(f"{record.topic} <non-JSON {len(record.value or b'')} bytes>", flush=True)
                continue
            data = event.get("data") or {}
            summary = " ".join(
                f"{k}={data[k]}" for k in ("invoiceNumber", "status", "amount", "amountPaid", "amountDue")
                if k in data
            )
            print(f"{event.get('time', '')[:23]} {record.topic:<22} {event.get('type', '?'):<24} "
                  f"{event.get('subject', '')} {summary}", flush=True)
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("topics", nargs="*", default=list(topics.ALL))
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--from-beginning", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(args.bootstrap, args.topics, args.from_beginning))


if __name__ == "__main__":
    sys.exit(main())
