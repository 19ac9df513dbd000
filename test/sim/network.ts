/**
 * The simulator's network: connections between processes, as ordered byte streams (TCP) whose
 * messages take a seeded time to arrive — so messages on different connections arrive in any
 * order — and that can be delayed for a while (a hung peer, a congested link) or cut (a reset:
 * what was in flight is lost and both ends see the connection close).
 */
import { EventEmitter } from 'node:events';
import type { DataServer } from '../../src/protocol/server.ts';
import type { ConnectTarget, ReadInto, StreamSocket, Transport } from '../../src/protocol/transport.ts';
import type { Random, SimProcess, SimWorld } from './world.ts';

export interface NetworkOptions {
  /** One-way latency range of a message. */
  latencyMsMin: number;
  latencyMsMax: number;
  /** Chance that a message is held back much longer (a delay spike), and for how long at most. */
  spikeChance: number;
  spikeMsMax: number;
}

export const DEFAULT_NETWORK: NetworkOptions = { latencyMsMin: 0.02, latencyMsMax: 0.5, spikeChance: 0.002, spikeMsMax: 200 };

class Link {
  readonly a: SimSocket;
  readonly b: SimSocket;
  cut = false;
  /** Until then nothing is delivered on this link (both ways). */
  heldUntilMs = 0;
  constructor(a: SimSocket, b: SimSocket) {
    this.a = a;
    this.b = b;
  }
}

class SimSocket extends EventEmitter implements StreamSocket {
  destroyed = false;
  readonly remoteAddress: string;
  readonly remotePort = 0;
  readonly owner: SimProcess;
  link: Link | null = null;
  peer: SimSocket | null = null;
  /** Client side: bytes go to the lent buffers; server side: 'data' events. */
  readonly readInto: ReadInto | null;
  private readonly network: SimNetwork;
  /** When this side's last message arrives at the peer: later ones arrive after it (a stream). */
  lastArrivalMs = 0;
  /** Sent and not yet arrived, in order. */
  readonly outbox: { atMs: number; bytes: Buffer | null }[] = [];
  private paused = false;
  private readonly held: Buffer[] = [];

  constructor(network: SimNetwork, owner: SimProcess, remoteAddress: string, readInto: ReadInto | null) {
    super();
    this.network = network;
    this.owner = owner;
    this.remoteAddress = remoteAddress;
    this.readInto = readInto;
  }

  write(buf: Uint8Array, written?: (err?: Error | null) => void): boolean {
    if (this.destroyed || this.link === null || this.link.cut) {
      if (written !== undefined) process.nextTick(written, new Error('socket closed'));
      return false;
    }
    // A copy now: the writer may reuse its buffer once `written` ran.
    const bytes = Buffer.from(buf);
    this.network.carry(this, bytes);
    if (written !== undefined) process.nextTick(written, null);
    return true;
  }

  cork(): void {}
  uncork(): void {}

  end(done?: () => void): unknown {
    this.close(false);
    if (done !== undefined) process.nextTick(done);
    return this;
  }

  destroy(): unknown {
    this.close(false);
    return this;
  }

  pause(): unknown {
    this.paused = true;
    return this;
  }

  resume(): unknown {
    if (!this.paused) return this;
    this.paused = false;
    const held = this.held.splice(0);
    for (const chunk of held) this.receive(chunk);
    return this;
  }

  /** Bytes arrived from the peer. */
  receive(bytes: Buffer): void {
    if (this.destroyed) return;
    if (this.readInto !== null) {
      let pos = 0;
      while (pos < bytes.length && !this.destroyed) {
        const dest = this.readInto.buffer();
        const n = Math.min(dest.length, bytes.length - pos);
        bytes.copy(dest, 0, pos, pos + n);
        pos += n;
        this.readInto.callback(n, dest);
      }
      return;
    }
    if (this.paused) {
      this.held.push(bytes);
      return;
    }
    this.emit('data', bytes);
  }

  /**
   * This side closes: it sees 'close' at once; the peer sees it once what was sent has arrived
   * (`reset`: at once, and what was in flight is lost).
   */
  close(reset: boolean): void {
    if (this.destroyed) return;
    this.destroyed = true;
    process.nextTick(() => this.emit('close'));
    const link = this.link;
    const peer = this.peer;
    if (link === null || peer === null) return;
    if (reset) link.cut = true;
    if (reset || !peer.owner.alive) {
      peer.closedByPeer();
      return;
    }
    this.network.carryClose(this);
  }

  closedByPeer(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    process.nextTick(() => this.emit('close'));
  }
}

interface Listener {
  owner: SimProcess;
  server: DataServer;
  /** Connections waiting for the hung owner to accept them: refused (reset) if it dies. */
  backlog: Set<() => void>;
}

export class SimNetwork {
  readonly world: SimWorld;
  private readonly random: Random;
  private readonly options: NetworkOptions;
  private readonly listeners = new Map<string, Listener>();
  private readonly links = new Set<Link>();
  /** Messages carried, and links cut (the run's statistics). */
  messages = 0;
  cuts = 0;

  constructor(world: SimWorld, random: Random, options: NetworkOptions = DEFAULT_NETWORK) {
    this.world = world;
    this.random = random;
    this.options = options;
  }

  /** `server` accepts connections to `address` ("HOST:PORT") until its process dies. */
  listen(address: string, owner: SimProcess, server: DataServer): void {
    const listener: Listener = { owner, server, backlog: new Set() };
    this.listeners.set(address, listener);
    owner.onKill(() => {
      if (this.listeners.get(address) === listener) this.listeners.delete(address);
      for (const refuse of listener.backlog) process.nextTick(refuse);
      listener.backlog.clear();
      for (const link of [...this.links]) {
        if (link.a.owner !== owner && link.b.owner !== owner) continue;
        // What a killed process had sent is in the kernel: half the time it still goes out, then
        // a FIN (a late write from a dead engine reaches a replica); else a reset loses it. A
        // machine that went down sends nothing more.
        const dead = link.a.owner === owner ? link.a : link.b;
        if (!owner.diedWithMachine && !link.cut && !dead.destroyed && this.random.chance(0.5)) {
          dead.destroyed = true;
          this.carryClose(dead);
        } else {
          this.cut(link);
        }
      }
    });
  }

  /** The transport a process connects through. */
  transport(owner: SimProcess): Transport {
    return { connect: (target, readInto) => this.connect(owner, target, readInto) };
  }

  private connect(owner: SimProcess, target: ConnectTarget, readInto: ReadInto): StreamSocket {
    const address = target.path ?? `${target.host}:${target.port}`;
    const client = new SimSocket(this, owner, address, readInto);
    const refuse = (): void => {
      if (client.destroyed) return;
      client.emit('error', Object.assign(new Error(`connect ECONNREFUSED ${address}`), { code: 'ECONNREFUSED' }));
      client.closedByPeer();
    };
    if (!owner.alive) {
      process.nextTick(refuse);
      return client;
    }
    // The connection is made to the listener found when it arrives; while that process hangs it
    // waits in its backlog, and is reset if that process dies (a new listener at the same address
    // is another socket: it never gets this connection).
    let waitingOn: Listener | null = null;
    const accept = (): void => {
      const listener = waitingOn ?? this.listeners.get(address);
      if (listener === undefined || !listener.owner.alive) return refuse();
      if (client.destroyed) return;
      const frozenMs = this.frozenMs(listener.owner);
      if (frozenMs > 0) {
        if (waitingOn === null) {
          waitingOn = listener;
          listener.backlog.add(refuse);
        }
        this.world.schedule(frozenMs, accept, owner);
        return;
      }
      listener.backlog.delete(refuse);
      const server = new SimSocket(this, listener.owner, `${owner.name}`, null);
      const link = new Link(client, server);
      link.heldUntilMs = this.world.nowMs + this.frozenMs(owner);
      client.link = link;
      server.link = link;
      client.peer = server;
      server.peer = client;
      this.links.add(link);
      client.lastArrivalMs = this.world.nowMs;
      server.lastArrivalMs = this.world.nowMs;
      listener.server.accept(server);
    };
    this.world.schedule(this.latency(), accept, owner);
    return client;
  }

  private frozenMs(p: SimProcess): number {
    return Math.max(0, p.frozenUntilMs - this.world.nowMs);
  }

  private latency(): number {
    const o = this.options;
    let ms = o.latencyMsMin + this.random.next() * (o.latencyMsMax - o.latencyMsMin);
    if (this.random.chance(o.spikeChance)) ms += this.random.next() * o.spikeMsMax;
    return ms;
  }

  /** Sends `bytes` from `from` to its peer: they arrive after the ones sent before. */
  carry(from: SimSocket, bytes: Buffer): void {
    this.messages++;
    const at = Math.max(this.world.nowMs + this.latency(), from.lastArrivalMs);
    from.lastArrivalMs = at;
    from.outbox.push({ atMs: at, bytes });
    if (from.outbox.length === 1) this.pump(from);
  }

  /** `from` closed: the peer sees it after what was sent before. */
  carryClose(from: SimSocket): void {
    from.outbox.push({ atMs: Math.max(this.world.nowMs, from.lastArrivalMs), bytes: null });
    if (from.outbox.length === 1) this.pump(from);
  }

  /** Delivers `from`'s messages in order, each at its time, none while the link is held. */
  private pump(from: SimSocket): void {
    const link = from.link!;
    const to = from.peer!;
    const first = from.outbox[0];
    if (first === undefined) return;
    const at = Math.max(first.atMs, link.heldUntilMs);
    this.world.schedule(at - this.world.nowMs, () => {
      if (link.cut) {
        from.outbox.length = 0;
        return;
      }
      if (link.heldUntilMs > this.world.nowMs) return this.pump(from);
      while (from.outbox.length > 0 && from.outbox[0].atMs <= this.world.nowMs && !link.cut) {
        const { bytes } = from.outbox.shift()!;
        if (bytes === null) to.closedByPeer();
        else to.receive(bytes);
      }
      this.pump(from);
    }, to.owner);
  }

  /** A reset: both ends see the connection close; what was in flight is lost. */
  cut(link: Link): void {
    if (link.cut) return;
    link.cut = true;
    this.links.delete(link);
    this.cuts++;
    link.a.closedByPeer();
    link.b.closedByPeer();
  }

  /** Cuts every connection between the two processes. */
  cutBetween(p: SimProcess, q: SimProcess): number {
    let n = 0;
    for (const link of [...this.links]) {
      if ((link.a.owner === p && link.b.owner === q) || (link.a.owner === q && link.b.owner === p)) {
        this.cut(link);
        n++;
      }
    }
    return n;
  }

  /**
   * The process hangs for `ms`: nothing moves on any of its connections, and connections made to
   * it meanwhile wait (as to a process that does not run: its backlog fills, nobody answers).
   */
  freeze(p: SimProcess, ms: number): void {
    const until = Math.max(p.frozenUntilMs, this.world.nowMs + ms);
    p.frozenUntilMs = until;
    for (const link of this.links) {
      if (link.a.owner === p || link.b.owner === p) link.heldUntilMs = Math.max(link.heldUntilMs, until);
    }
  }

  /** Nothing moves between the two processes for `ms` (a hung peer, a stalled link); then all of it arrives. */
  holdBetween(p: SimProcess, q: SimProcess, ms: number): void {
    for (const link of this.links) {
      if ((link.a.owner === p && link.b.owner === q) || (link.a.owner === q && link.b.owner === p)) {
        link.heldUntilMs = Math.max(link.heldUntilMs, this.world.nowMs + ms);
      }
    }
  }
}
