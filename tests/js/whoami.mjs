// whoami.mjs: an application as the AWS SDK for JavaScript v3 sees it. It loads credentials
// through the SDK's default Node.js chain (in an injected container that is the HTTP provider,
// reading AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]).
//
//   node whoami.mjs          calls sts:GetCallerIdentity (at AWS_ENDPOINT_URL when set) and
//                            prints {"Arn", "Account", "AccessKeyId", "Expiry"} as JSON
//   node whoami.mjs twice    prints `first <AccessKeyId>`, waits for a line on stdin, fetches
//                            again, bypassing the SDK's cache (a fresh provider call, so the token
//                            file is read again), and prints `second <AccessKeyId>`
//
// With IAMB_TIMING=1 it also prints `first credentials after <ms> ms, at <ms> ms since the
// epoch` (from process start, and on the wall clock) on stderr. On failure: the error on stderr, exit 1. It prints no secret.
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";

import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";
import { fromNodeProviderChain } from "@aws-sdk/credential-providers";

/**
 * The chain's logger: it keeps why each link failed, since the chain's own error only says that
 * none answered. (None of these messages holds the token.)
 */
const failures = [];
const logger = {
  debug: (message) => {
    if (String(message).startsWith("@smithy/property-provider")) failures.push(message);
  },
  info: () => {},
  warn: (message) => process.stderr.write(`${message}\n`),
  error: (message) => process.stderr.write(`${message}\n`),
};

/** Credentials from the default chain, timed from process start when IAMB_TIMING=1. */
async function firstCredentials(provider) {
  const credentials = await provider();
  if (process.env.IAMB_TIMING === "1") {
    // performance.now() counts from the process's time origin, its start.
    process.stderr.write(
      `first credentials after ${performance.now().toFixed(1)} ms, ` +
        `at ${(performance.timeOrigin + performance.now()).toFixed(1)} ms since the epoch\n`,
    );
  }
  return credentials;
}

/** One line of stdin (or its end). */
function oneLine() {
  const lines = createInterface({ input: process.stdin });
  return new Promise((resolve) => {
    lines.once("line", () => {
      lines.close();
      resolve();
    });
    lines.once("close", resolve);
  });
}

async function whoami(provider) {
  const credentials = await firstCredentials(provider);
  const sts = new STSClient({
    credentials: provider,
    // The SDK reads AWS_ENDPOINT_URL itself too; said here so that moto is what is asked.
    ...(process.env.AWS_ENDPOINT_URL ? { endpoint: process.env.AWS_ENDPOINT_URL } : {}),
  });
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  const expiry = credentials.expiration ? Math.floor(credentials.expiration.getTime() / 1000) : null;
  console.log(
    JSON.stringify({
      Arn: identity.Arn,
      Account: identity.Account,
      AccessKeyId: credentials.accessKeyId,
      Expiry: expiry,
    }),
  );
}

async function twice(provider) {
  const first = await firstCredentials(provider);
  console.log(`first ${first.accessKeyId}`);
  await oneLine();
  // forceRefresh: the chain runs again (a new HTTP provider, the token file read again) instead
  // of answering from the memoized credentials, which are valid for the next hour.
  const second = await provider({ forceRefresh: true });
  console.log(`second ${second.accessKeyId}`);
}

const [argument, ...rest] = process.argv.slice(2);
const mode = argument === undefined ? whoami : argument === "twice" ? twice : undefined;
if (!mode || rest.length > 0) {
  process.stderr.write("usage: node whoami.mjs [twice]\n");
  process.exit(2);
}
try {
  await mode(fromNodeProviderChain({ logger }));
} catch (error) {
  // The name says which step failed (CredentialsProviderError, or the STS error's code).
  process.stderr.write(`whoami.mjs: ${error?.name ?? "Error"}: ${error?.message ?? error}\n`);
  for (const failure of new Set(failures)) process.stderr.write(`  ${failure}\n`);
  process.exit(1);
}
