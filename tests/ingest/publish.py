#!/usr/bin/env python3
"""Another observatory's pipeline asking prodsys for a production.

Written only against the public `cloudevents` (v2, its AMQP and RabbitMQ
bindings) and `pika` packages, as an external system would be. It publishes
request events to the `prodsys.ingest` exchange in three encodings, waits for
prodsys's answers on its own reply queue, and prints one JSON line per answer.

usage: publish.py AMQP_URL INGEST_EXCHANGE REQUEST_FILE
"""

import json
import sys
import time
import uuid

import pika
from cloudevents.core.bindings import amqp, rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

SUBMIT = "org.prodsys.request.submit.v1"
SOURCE = "/km3net/orca/pipeline"


def event(data, event_id=None):
    return CloudEvent(
        attributes={"type": SUBMIT, "source": SOURCE, "id": event_id or str(uuid.uuid4())},
        data=data,
    )


def main():
    url, exchange, request_file = sys.argv[1:4]
    with open(request_file) as f:
        request = json.load(f)
    data = {k: request[k] for k in ("profile", "vo", "parameters")}

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    reply_to = channel.queue_declare(queue="", exclusive=True).method.queue

    def publish(headers, content_type, body):
        channel.basic_publish(
            exchange,
            SUBMIT,
            body,
            pika.BasicProperties(
                headers=headers or None,
                content_type=content_type,
                reply_to=reply_to,
                delivery_mode=2,
            ),
            mandatory=True,
        )

    sent = {}
    fmt = JSONFormat()

    # 1. Structured mode: the whole event as JSON.
    structured = event(data)
    message = rabbitmq.to_structured(structured, fmt)
    publish(message.headers, message.content_type, message.body)
    sent[structured.get_id()] = "structured"

    # 2. Binary mode, AMQP binding (cloudEvents_ headers), another zenith.
    other = dict(data, parameters=dict(data["parameters"], zenith_deg=40))
    binary = event(other)
    message = amqp.to_binary(binary, fmt)
    headers = {k: v for k, v in message.application_properties.items()}
    publish(headers, "application/json", message.application_data)
    sent[binary.get_id()] = "binary-amqp"

    # 3. Binary mode, RabbitMQ binding (ce- headers), parameters out of range.
    bad = dict(data, parameters=dict(data["parameters"], zenith_deg=95))
    invalid = event(bad)
    message = rabbitmq.to_binary(invalid, fmt)
    publish(message.headers, "application/json", message.body)
    sent[invalid.get_id()] = "binary-rabbitmq-invalid"

    # 4. The first event again (a redelivery from our side): no second request.
    message = rabbitmq.to_structured(structured, fmt)
    publish(message.headers, message.content_type, message.body)

    answers = []
    deadline = time.time() + 60
    while len(answers) < 3 and time.time() < deadline:
        method, properties, body = channel.basic_get(reply_to, auto_ack=True)
        if method is None:
            connection.sleep(0.05)
            continue
        answer = json.loads(body)
        answer["sent_as"] = sent.get(answer["correlation_id"], "unknown")
        answer["content_type"] = properties.content_type
        answer["cloudevents_type"] = (properties.headers or {}).get("cloudEvents_type")
        answers.append(answer)
    # Give a wrongly made second answer time to show up.
    connection.sleep(1.0)
    method, _, body = channel.basic_get(reply_to, auto_ack=True)
    if method is not None:
        answers.append(dict(json.loads(body), sent_as="extra"))
    for answer in answers:
        print(json.dumps(answer))
    connection.close()


if __name__ == "__main__":
    main()
