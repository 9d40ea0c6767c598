/**
 * fleet.ts: a small Docket client in TypeScript, on the code generated in src/gen.
 *
 * It lists the images and the agents, then optionally follows a rollout (or starts one and
 * follows it) to its end, over gRPC (HTTP/2 over TLS) with @connectrpc/connect-node.
 *
 *   DOCKET_SERVER=127.0.0.1:7800 npx tsx examples/fleet.ts                  # images, agents
 *   DOCKET_SERVER=… npx tsx examples/fleet.ts ROLLOUT_ID                    # … and follow it
 *   DOCKET_SERVER=… npx tsx examples/fleet.ts --start IMAGE SELECTOR [--prefetch-only]
 *
 * DOCKET_TOKEN is sent as `authorization: Bearer TOKEN` on every call (a viewer token is
 * enough to list and follow, `docketctl tokens create --role viewer`; --start needs an
 * operator's). DOCKET_CA names the CA file the server's certificate is checked against (the
 * server's <data-dir>/ca.pem); without it, the system's CAs. DOCKET_INSECURE=1 talks
 * plaintext (h2c), to a server running with --insecure.
 *
 * Every line on stdout is one record, its fields separated by single spaces; free text (a
 * note, a reason) comes last:
 *
 *   image NAME DIGEST SIZE_BYTES
 *   images COUNT
 *   agent NAME AGENT_STATE_… GROUP,GROUP (or -)
 *   agents COUNT
 *   rollout ID IMAGE HOST_COUNT                         after --start created it
 *   event snapshot ID ROLLOUT_STATE_… HOST_COUNT       the first event of a watch, followed by
 *                                                      an `event host` line for each of its hosts
 *   event host NAME TASK_STATE_… DONE/TOTAL [NOTE]     a host's state changed (progress-only
 *                                                      events are not printed)
 *   event state ROLLOUT_STATE_… [REASON]               the last event
 *
 * A failed call prints one line on stderr, `error CODE REASON MESSAGE`: the canonical gRPC
 * code and the google.rpc.ErrorInfo reason (`-` when the error carries none).
 *
 * Exit status: 0 on success (a followed rollout succeeded), 1 on an error, and, as for
 * `docketctl rollout`, 3 when the rollout failed, 4 when it was cancelled, 5 when it timed out.
 */

import { readFileSync } from "node:fs";

import type { DescEnum } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AgentAdminService } from "../src/gen/docket/v1/agent_admin_service_pb.js";
import { AgentStateSchema, TaskStateSchema } from "../src/gen/docket/v1/agent_pb.js";
import { ImageService } from "../src/gen/docket/v1/image_service_pb.js";
import {
  type RolloutEvent,
  type RolloutHost,
  RolloutState,
  RolloutStateSchema,
} from "../src/gen/docket/v1/rollout_pb.js";
import { RolloutService } from "../src/gen/docket/v1/rollout_service_pb.js";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";

const DOMAIN = "docket.dev";
const CALL_TIMEOUT_MS = 30_000;
const EXIT_CODES: Partial<Record<RolloutState, number>> = {
  [RolloutState.SUCCEEDED]: 0,
  [RolloutState.FAILED]: 3,
  [RolloutState.CANCELLED]: 4,
  [RolloutState.TIMED_OUT]: 5,
};

/** The proto name of an enum value, such as "ROLLOUT_STATE_SUCCEEDED". */
function enumName(schema: DescEnum, value: number): string {
  return schema.value[value]?.name ?? String(value);
}

/** Adds `authorization: Bearer TOKEN` to every request. */
function bearer(token: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

/** One line for a failed call: the canonical code, the ErrorInfo reason and the message. */
function errorLine(err: unknown): string {
  const e = ConnectError.from(err);
  // Code.NotFound is "NotFound" in connect; gRPC's canonical name is NOT_FOUND.
  const code = Code[e.code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
  const infos = e.findDetails(ErrorInfoSchema); // decoded from grpc-status-details-bin
  const info = infos.find((i) => i.domain === DOMAIN) ?? infos[0];
  return `error ${code} ${info?.reason || "-"} ${e.rawMessage}`;
}

function hostLine(host: RolloutHost): string {
  const note = host.error ? ` ${host.error}` : "";
  return (
    `event host ${host.agentName} ${enumName(TaskStateSchema, host.state)} ` +
    `${host.doneBytes}/${host.totalBytes}${note}`
  );
}

function usage(): never {
  process.stderr.write(
    "usage: fleet.ts [ROLLOUT_ID | --start IMAGE SELECTOR [--prefetch-only]]\n" +
      "  DOCKET_SERVER=host:port (default 127.0.0.1:7800), DOCKET_TOKEN=bearer token\n",
  );
  process.exit(2);
}

async function main(argv: string[]): Promise<number> {
  let watchId = "";
  let start: { image: string; selector: string; prefetchOnly: boolean } | undefined;
  if (argv[0] === "--start") {
    const rest = argv.slice(1).filter((a) => a !== "--prefetch-only");
    if (rest.length !== 2 || rest.some((a) => a.startsWith("-"))) usage();
    start = { image: rest[0], selector: rest[1], prefetchOnly: argv.includes("--prefetch-only") };
  } else if (argv.length === 1 && !argv[0].startsWith("-")) {
    watchId = argv[0];
  } else if (argv.length !== 0) {
    usage();
  }

  const server = process.env.DOCKET_SERVER || "127.0.0.1:7800";
  const token = process.env.DOCKET_TOKEN;
  const ca = process.env.DOCKET_CA;
  const insecure = process.env.DOCKET_INSECURE === "1";
  // The gRPC protocol over HTTP/2: TLS, checked against DOCKET_CA (or the system's CAs);
  // "http://" means plaintext (h2c).
  const transport = createGrpcTransport({
    baseUrl: server.includes("://") ? server : `${insecure ? "http" : "https"}://${server}`,
    nodeOptions: ca ? { ca: readFileSync(ca) } : {},
    interceptors: token ? [bearer(token)] : [],
  });
  const images = createClient(ImageService, transport);
  const agents = createClient(AgentAdminService, transport);
  const rollouts = createClient(RolloutService, transport);
  const opts = { timeoutMs: CALL_TIMEOUT_MS };

  let count = 0;
  let pageToken = "";
  do {
    const page = await images.listImages({ pageToken }, opts);
    for (const image of page.images) {
      console.log(`image ${image.name} ${image.digest} ${image.sizeBytes}`);
      count++;
    }
    pageToken = page.nextPageToken;
  } while (pageToken);
  console.log(`images ${count}`);

  count = 0;
  do {
    const page = await agents.listAgents({ selector: "all", pageToken }, opts);
    for (const agent of page.agents) {
      const groups = agent.groups.length ? agent.groups.join(",") : "-";
      console.log(`agent ${agent.name} ${enumName(AgentStateSchema, agent.state)} ${groups}`);
      count++;
    }
    pageToken = page.nextPageToken;
  } while (pageToken);
  console.log(`agents ${count}`);

  if (start) {
    const { rollout } = await rollouts.createRollout(
      { imageName: start.image, selector: start.selector, prefetchOnly: start.prefetchOnly },
      opts,
    );
    if (!rollout) throw new Error("CreateRollout returned no rollout");
    console.log(`rollout ${rollout.id} ${rollout.imageName} ${rollout.hosts.length}`);
    watchId = rollout.id;
  }
  if (!watchId) return 0;

  // A snapshot first, then every change until the rollout ends, many to a message
  // (`batched`). Host events also carry progress (bytes, pieces, rate, peers) several times a
  // second: print state changes only.
  const seen = new Map<string, number>();
  /** Prints one event; the exit code once the rollout has ended. */
  const show = async (change: RolloutEvent["change"]): Promise<number | undefined> => {
    switch (change.case) {
      case "snapshot": {
        const r = change.value;
        console.log(
          `event snapshot ${r.id} ${enumName(RolloutStateSchema, r.state)} ${r.hosts.length}`,
        );
        for (const host of r.hosts) {
          seen.set(host.agentName, host.state);
          console.log(hostLine(host));
        }
        return undefined;
      }
      case "host":
        if (seen.get(change.value.agentName) !== change.value.state) {
          seen.set(change.value.agentName, change.value.state);
          console.log(hostLine(change.value));
        }
        return undefined;
      case "state": {
        if (change.value === RolloutState.RUNNING) return undefined; // not an end
        let reason = "";
        if (change.value !== RolloutState.SUCCEEDED) {
          const { rollout } = await rollouts.getRollout({ id: watchId }, opts);
          reason = rollout?.reason ? ` ${rollout.reason}` : "";
        }
        console.log(`event state ${enumName(RolloutStateSchema, change.value)}${reason}`);
        return EXIT_CODES[change.value] ?? 1;
      }
      default:
        return undefined;
    }
  };
  for await (const response of rollouts.watchRollout({ id: watchId, batched: true })) {
    // A server older than batches sends one event a message, in `event`.
    for (const event of response.event ? [response.event] : response.events) {
      const code = await show(event.change);
      if (code !== undefined) return code;
    }
  }
  // The server ends a watch early only when it shuts down: watch again to go on.
  process.stderr.write(`error UNAVAILABLE - the watch ended before the rollout did\n`);
  return 1;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`${errorLine(err)}\n`);
    process.exitCode = 1;
  },
);
