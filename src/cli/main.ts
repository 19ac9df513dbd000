#!/usr/bin/env node
/** The `zebu` command. */
import { Command } from 'commander';
import { ZebuError } from '../errors.ts';
import { replicaServe } from './replica-serve.ts';

function fail(err: unknown): never {
  const message = err instanceof ZebuError ? `${err.message} (${err.code})` : err instanceof Error ? err.message : String(err);
  process.stderr.write(`zebu: ${message}\n`);
  process.exit(1);
}

const program = new Command();
program.name('zebu').description('Zebu: replicated block storage served over NBD').showHelpAfterError();

const replica = program.command('replica').description('replica processes (data plane, no manager needed)');
replica
  .command('serve')
  .description('serve one replica directory over the data protocol')
  .requiredOption('--dir <DIR>', 'replica directory (created when empty)')
  .requiredOption('--size <BYTES>', 'volume size, e.g. 1073741824 or 1GiB (multiple of 4096)')
  .requiredOption('--listen <HOST:PORT>', 'address to listen on (port 0: any free port)')
  .requiredOption('--secret-file <FILE>', 'file holding the cluster secret (at least 16 bytes)')
  .option('--backing <FILE>', 'raw image used as the read-only base layer (new replicas only)')
  .option('--max-layers <N>', 'maximum number of layers (new replicas only)', undefined)
  .option('--fault-injection', 'accept FAULT_INJECT requests (tests only)')
  .action((opts) => replicaServe(opts).catch(fail));

program.parseAsync(process.argv).catch(fail);
