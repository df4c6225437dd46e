#!/usr/bin/env python3
"""Publishes QoS 0, 1 and 2 with MQTT 3.1.1 and then with MQTT 5 over TLS, using Eclipse
paho-mqtt (a client nobody on this project wrote), with a device certificate.

Used by gateway/tests/ingest_paho.rs. Topics: <prefix>/v311/q<qos> and <prefix>/v5/q<qos>;
payload "paho-<version>-q<qos>". MQTT 5 publishes carry user properties site=north, unit=C
(in that order), content type application/json and payload format indicator 1.

Exit status 0 only when every publish completed (QoS 1: PUBACK, QoS 2: PUBCOMP received).
Works with paho-mqtt 1.6 and 2.x.
"""

import argparse
import ssl
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TIMEOUT = 10.0


def new_client(client_id, protocol):
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
    return mqtt.Client(client_id=client_id, protocol=protocol)


def run(args, protocol, label):
    client = new_client(args.client_id, protocol)
    client.tls_set(
        ca_certs=args.cafile,
        certfile=args.cert,
        keyfile=args.key,
        cert_reqs=ssl.CERT_REQUIRED,
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    connected = threading.Event()
    result = {}

    def on_connect(_client, _userdata, _flags, reason_code, _properties=None):
        result["rc"] = reason_code
        connected.set()

    client.on_connect = on_connect
    if protocol == mqtt.MQTTv5:
        client.connect(args.host, args.port, keepalive=30, clean_start=True)
    else:
        client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(TIMEOUT):
            raise RuntimeError(f"{label}: no CONNACK within {TIMEOUT}s")
        rc = result["rc"]
        if (rc.is_failure if hasattr(rc, "is_failure") else rc != 0):
            raise RuntimeError(f"{label}: connection refused: {rc}")
        for qos in (0, 1, 2):
            topic = f"{args.topic_prefix}/{label}/q{qos}"
            payload = f"paho-{label}-q{qos}"
            props = None
            if protocol == mqtt.MQTTv5:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("site", "north"), ("unit", "C")]
                props.ContentType = "application/json"
                props.PayloadFormatIndicator = 1
            info = client.publish(topic, payload, qos=qos, properties=props)
            info.wait_for_publish(timeout=TIMEOUT)
            if not info.is_published():
                raise RuntimeError(f"{label}: {topic} QoS {qos} not acknowledged")
            print(f"published {topic} qos {qos}", flush=True)
    finally:
        client.disconnect()
        client.loop_stop()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--topic-prefix", required=True)
    args = p.parse_args()
    run(args, mqtt.MQTTv311, "v311")
    run(args, mqtt.MQTTv5, "v5")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - report any failure as exit 1 with the reason
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
