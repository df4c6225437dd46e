#!/usr/bin/env python3
"""Subscribes with Eclipse paho-mqtt (a client nobody on this project wrote) over mutual TLS, with
MQTT 3.1.1 or 5, and prints what it receives; a second paho client publishes.

Used by gateway/tests/subscriptions_clients.rs. Clients: the subscriber uses --sub-id (its
certificate sub-id.pem/key in --devices), the publisher --pub-id, a third client --other-id
(MQTT 5 only). Topics live under devices/<pub-id>/paho-<label>/.

Scenario (each step waits for its acknowledgement):
  1. the publisher publishes a retained QoS 1 message to .../state ("retained-<label>");
  2. the subscriber subscribes to devices/<pub-id>/paho-<label>/# at QoS 2 and receives it
     (retain flag set); MQTT 5: with Subscription Identifier 11;
  3. the publisher publishes "q1-<label>" at QoS 1 and "q2-<label>" at QoS 2 to .../data;
     MQTT 5: q1 with Message Expiry Interval 3600, Response Topic .../reply and Correlation
     Data "c-1";
  4. the subscriber receives both and leaves; the publisher clears the retained message.
  MQTT 5 only, then:
  5. the publisher subscribes to devices/+/paho-<label>-nl with no-local and retain handling 2
     (send no retained messages) after a retained message is there; it publishes "own" itself
     and the other client then publishes "other" to its own devices/<other-id>/paho-<label>-nl.
     Deliveries keep the order of the queue, so when "other" arrives "own" would have come first
     had no-local not held it back.

Prints one JSON object per line for each message a subscriber received:
{"to": <client>, "topic", "payload", "qos", "retain"} (MQTT 5 adds "sub_ids", "expiry",
"response_topic", "correlation" where the PUBLISH had them) and {"suback": [codes]} per SUBACK, then
"DONE". Exit status 0 only when every step completed within its time.
Works with paho-mqtt 2.x.
"""

import argparse
import json
import os
import queue
import ssl
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 10.0


def emit(obj):
    print(json.dumps(obj), flush=True)


class Client:
    def __init__(self, args, client_id, protocol):
        self.id = client_id
        self.protocol = protocol
        self.messages = queue.Queue()
        self.subacks = queue.Queue()
        self.connected = threading.Event()
        self.rc = None
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        c.tls_set(
            ca_certs=args.cafile,
            certfile=os.path.join(args.devices, f"{client_id}.pem"),
            keyfile=os.path.join(args.devices, f"{client_id}.key"),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        c.on_connect = self.on_connect
        c.on_message = self.on_message
        c.on_subscribe = self.on_subscribe
        self.c = c
        if protocol == mqtt.MQTTv5:
            c.connect(args.host, args.port, keepalive=30, clean_start=True)
        else:
            c.connect(args.host, args.port, keepalive=30)
        c.loop_start()
        if not self.connected.wait(TIMEOUT):
            raise RuntimeError(f"{client_id}: no CONNACK within {TIMEOUT}s")
        if self.rc.is_failure:
            raise RuntimeError(f"{client_id}: connection refused: {self.rc}")

    def on_connect(self, _c, _u, _flags, reason_code, _props=None):
        self.rc = reason_code
        self.connected.set()

    def on_message(self, _c, _u, msg):
        m = {
            "to": self.id,
            "topic": msg.topic,
            "payload": msg.payload.decode(),
            "qos": msg.qos,
            "retain": bool(msg.retain),
        }
        props = getattr(msg, "properties", None)
        for key, name in [
            ("sub_ids", "SubscriptionIdentifier"),
            ("expiry", "MessageExpiryInterval"),
            ("response_topic", "ResponseTopic"),
            ("correlation", "CorrelationData"),
        ]:
            value = getattr(props, name, None) if props is not None else None
            if value is not None:
                m[key] = value.decode() if isinstance(value, bytes) else value
        emit(m)
        self.messages.put(m)

    def on_subscribe(self, _c, _u, _mid, reason_codes, _props=None):
        codes = [rc.value for rc in reason_codes]
        emit({"suback": codes, "by": self.id})
        self.subacks.put(codes)

    def subscribe(self, topic, options, sub_id=None):
        if self.protocol == mqtt.MQTTv5:
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            self.c.subscribe(topic, options=options, properties=props)
        else:
            self.c.subscribe(topic, qos=options.QoS)
        try:
            return self.subacks.get(timeout=TIMEOUT)
        except queue.Empty:
            raise RuntimeError(f"{self.id}: no SUBACK for {topic}") from None

    def publish(self, topic, payload, qos, retain=False, properties=None):
        info = self.c.publish(
            topic, payload, qos=qos, retain=retain, properties=properties
        )
        info.wait_for_publish(timeout=TIMEOUT)
        if not info.is_published():
            raise RuntimeError(f"{self.id}: {topic} QoS {qos} not acknowledged")

    def expect(self, payload):
        """Waits for the message with `payload`; returns the messages up to and with it."""
        got = []
        while True:
            try:
                m = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise RuntimeError(
                    f"{self.id}: {payload!r} not received; got {got}"
                ) from None
            got.append(m)
            if m["payload"] == payload:
                return got

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--devices", required=True, help="directory of <id>.pem / <id>.key")
    p.add_argument("--version", choices=["v311", "v5"], required=True)
    p.add_argument("--sub-id", required=True)
    p.add_argument("--pub-id", required=True)
    p.add_argument("--other-id", required=True)
    args = p.parse_args()
    v5 = args.version == "v5"
    protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    label = args.version
    base = f"devices/{args.pub_id}/paho-{label}"

    pub = Client(args, args.pub_id, protocol)
    pub.publish(f"{base}/state", f"retained-{label}", 1, retain=True)
    sub = Client(args, args.sub_id, protocol)
    sub.subscribe(f"{base}/#", SubscribeOptions(qos=2), sub_id=11 if v5 else None)
    sub.expect(f"retained-{label}")
    q1_props = None
    if v5:
        q1_props = Properties(PacketTypes.PUBLISH)
        q1_props.MessageExpiryInterval = 3600
        q1_props.ResponseTopic = f"{base}/reply"
        q1_props.CorrelationData = b"c-1"
    pub.publish(f"{base}/data", f"q1-{label}", 1, properties=q1_props)
    pub.publish(f"{base}/data", f"q2-{label}", 2)
    sub.expect(f"q2-{label}")
    sub.close()
    pub.publish(f"{base}/state", b"", 1, retain=True)

    if v5:
        nl = f"paho-{label}-nl"
        pub.publish(f"devices/{args.pub_id}/{nl}", "retained-nl", 1, retain=True)
        pub.subscribe(
            f"devices/+/{nl}",
            SubscribeOptions(
                qos=1,
                noLocal=True,
                retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND,
            ),
        )
        pub.publish(f"devices/{args.pub_id}/{nl}", "own", 1)
        other = Client(args, args.other_id, protocol)
        other.publish(f"devices/{args.other_id}/{nl}", "other", 1)
        pub.expect("other")
        pub.publish(f"devices/{args.pub_id}/{nl}", b"", 1, retain=True)
        other.close()
    pub.close()
    emit("DONE")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - report any failure as exit 1 with the reason
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
