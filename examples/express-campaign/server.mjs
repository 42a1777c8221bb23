// An Express app that runs an outbound campaign through callbridge's gRPC API:
//
//   POST /campaigns              creates the agent, the campaign and its numbers, starts it
//   GET  /campaigns/:id          the campaign now (Calls/GetCampaign)
//   GET  /campaigns/:id/progress its progress as server-sent events, from Calls/WatchCampaign
//
//   CONTROL_ADDR=127.0.0.1:50051 CONTROL_APP_TOKEN=… node server.mjs
//
// Environment:
//   CONTROL_ADDR       host:port of the control plane (required)
//   CONTROL_APP_TOKEN  bearer token of the public API (required)
//   CONTROL_TLS        `true`: TLS with the system roots (default plaintext, as on loopback)
//   PORT               HTTP port on 127.0.0.1 (default 3000; 0 picks a free one)
//   CALLBRIDGE_PROTO   path of callbridge.proto (default: the one in this repository)
//
// Once listening it prints `LISTENING <port>` on stdout.

import { fileURLToPath } from 'node:url';
import path from 'node:path';
import express from 'express';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
const protoFile =
  process.env.CALLBRIDGE_PROTO ??
  path.join(here, '..', '..', 'proto', 'proto', 'callbridge', 'v1', 'callbridge.proto');

function required(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set`);
    process.exit(64);
  }
  return v;
}

const controlAddr = required('CONTROL_ADDR');
const appToken = required('CONTROL_APP_TOKEN');
const port = Number.parseInt(process.env.PORT ?? '3000', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`PORT must be a port number, got ${process.env.PORT}`);
  process.exit(64);
}

// The .proto at run time, field names as written there (`campaign_id`), enums as names.
const def = protoLoader.loadSync(protoFile, {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(def).callbridge.v1;

// Every call carries the app token; over TLS it rides on the channel credentials.
const channelCreds =
  process.env.CONTROL_TLS === 'true'
    ? grpc.credentials.createSsl()
    : grpc.credentials.createInsecure();
const authMetadata = () => {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${appToken}`);
  return md;
};
const agents = new v1.Agents(controlAddr, channelCreds);
const calls = new v1.Calls(controlAddr, channelCreds);

// A unary call as a promise, with a deadline.
function unary(client, method, request, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    client[method](
      request,
      authMetadata(),
      { deadline: new Date(Date.now() + timeoutMs) },
      (err, response) => (err ? reject(err) : resolve(response)),
    );
  });
}

// gRPC status → HTTP status for the app's own clients.
const httpStatus = {
  [grpc.status.INVALID_ARGUMENT]: 400,
  [grpc.status.NOT_FOUND]: 404,
  [grpc.status.ALREADY_EXISTS]: 409,
  [grpc.status.FAILED_PRECONDITION]: 409,
  [grpc.status.RESOURCE_EXHAUSTED]: 429,
  [grpc.status.UNAVAILABLE]: 503,
  [grpc.status.DEADLINE_EXCEEDED]: 504,
};

function sendError(res, err) {
  const status = httpStatus[err.code] ?? 502;
  res.status(status).json({ error: err.details ?? String(err), grpc_code: err.code });
}

// AddCampaignNumbers takes at most 10,000 numbers per request.
const NUMBERS_PER_REQUEST = 10_000;

const app = express();
app.use(express.json({ limit: '5mb' }));

// Body: { agent: AgentSettings, agent_id?, campaign_id?, settings: CampaignSettings
// without agent_id, numbers: [{ number, metadata?, time_zone? }] }. Answers 201 with the
// started campaign.
app.post('/campaigns', async (req, res) => {
  const body = req.body ?? {};
  if (!Array.isArray(body.numbers) || body.numbers.length === 0) {
    res.status(400).json({ error: 'numbers: a non-empty list is required' });
    return;
  }
  try {
    const agent = await unary(agents, 'CreateAgent', {
      agent_id: body.agent_id ?? '',
      settings: body.agent ?? {},
    });
    const created = await unary(calls, 'CreateCampaign', {
      campaign_id: body.campaign_id ?? '',
      settings: { ...(body.settings ?? {}), agent_id: agent.agent_id },
    });
    const id = created.campaign_id;
    for (let i = 0; i < body.numbers.length; i += NUMBERS_PER_REQUEST) {
      await unary(calls, 'AddCampaignNumbers', {
        campaign_id: id,
        numbers: body.numbers.slice(i, i + NUMBERS_PER_REQUEST),
      });
    }
    const started = await unary(calls, 'StartCampaign', { campaign_id: id });
    res.status(201).json({ agent_id: agent.agent_id, campaign: started });
  } catch (err) {
    sendError(res, err);
  }
});

app.get('/campaigns/:id', async (req, res) => {
  try {
    res.json(await unary(calls, 'GetCampaign', { campaign_id: req.params.id }));
  } catch (err) {
    sendError(res, err);
  }
});

// Server-sent events: one `progress` event per campaign view WatchCampaign sends (the
// current one first), then `end` when the campaign has settled, or `error`.
app.get('/campaigns/:id/progress', (req, res) => {
  const watch = calls.WatchCampaign({ campaign_id: req.params.id }, authMetadata());
  // grpc-js may emit `end` after `error`: answer once.
  let open = false;
  let finished = false;
  const start = () => {
    if (open) return;
    open = true;
    res.writeHead(200, {
      'Content-Type': 'text/event-stream',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
    });
  };
  const event = (name, data) => {
    start();
    res.write(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`);
  };
  watch.on('data', (campaign) => {
    if (finished) return;
    event('progress', {
      campaign_id: campaign.campaign_id,
      state: campaign.state,
      progress: campaign.progress,
    });
  });
  watch.on('end', () => {
    if (finished) return;
    finished = true;
    event('end', {});
    res.end();
  });
  watch.on('error', (err) => {
    if (finished) return;
    finished = true;
    if (err.code === grpc.status.CANCELLED) return;
    // Refused before anything was sent (unknown campaign, bad id): a plain HTTP error.
    if (!open) {
      sendError(res, err);
      return;
    }
    event('error', { error: err.details ?? String(err), grpc_code: err.code });
    res.end();
  });
  // The browser went away: stop watching.
  res.on('close', () => {
    finished = true;
    watch.cancel();
  });
});

const server = app.listen(port, '127.0.0.1', () => {
  console.log(`LISTENING ${server.address().port}`);
});

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
