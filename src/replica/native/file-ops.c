/*
 * The two file operations Zebu needs that Node's fs lacks. Built at install time by
 * scripts/build-native.sh (Node-API, so any Node >= 18 loads it); without it Zebu still runs.
 *
 *   punchHole(fd, offset, length, callback(errno))   fallocate(PUNCH_HOLE | KEEP_SIZE): a TRIM or
 *       WRITE_ZEROES gives the file system its blocks back. On the libuv thread pool: on a large
 *       range the file system frees many extents and journals them, which must not stall the loop.
 *   readCached(fd, buffer, offset, length, position) -> bytes read, or -errno
 *       preadv2(RWF_NOWAIT): reads only what the page cache holds, never waits for the disk
 *       (-EAGAIN then). Synchronous: a cached 4 KiB read costs a few microseconds here, against
 *       tens for a thread-pool round trip; a miss costs one system call and goes to the pool.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <linux/falloc.h>
#include <node_api.h>

typedef struct {
  int fd;
  int64_t offset;
  int64_t length;
  int err;
  napi_async_work work;
  napi_ref callback;
} PunchJob;

static void punch_execute(napi_env env, void *data) {
  (void)env;
  PunchJob *job = data;
  int r;
  do {
    r = fallocate(job->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)job->offset, (off_t)job->length);
  } while (r != 0 && errno == EINTR);
  job->err = r == 0 ? 0 : errno;
}

static void punch_complete(napi_env env, napi_status status, void *data) {
  PunchJob *job = data;
  napi_value callback, recv, arg;
  if (napi_get_reference_value(env, job->callback, &callback) == napi_ok &&
      napi_get_undefined(env, &recv) == napi_ok &&
      napi_create_int32(env, status == napi_ok ? job->err : ECANCELED, &arg) == napi_ok) {
    napi_call_function(env, recv, callback, 1, &arg, NULL);
  }
  napi_delete_reference(env, job->callback);
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  int32_t fd;
  int64_t offset, length;
  napi_valuetype type;
  if (argc != 4 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok ||
      napi_typeof(env, argv[3], &type) != napi_ok || type != napi_function ||
      fd < 0 || offset < 0 || length <= 0) {
    napi_throw_type_error(env, NULL, "punchHole(fd >= 0, offset >= 0, length > 0, callback)");
    return NULL;
  }
  PunchJob *job = calloc(1, sizeof(*job));
  if (job == NULL) {
    napi_throw_error(env, NULL, "punchHole: out of memory");
    return NULL;
  }
  job->fd = fd;
  job->offset = offset;
  job->length = length;
  napi_value name;
  if (napi_create_string_utf8(env, "zebu:punchHole", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_reference(env, argv[3], 1, &job->callback) != napi_ok) {
    free(job);
    napi_throw_error(env, NULL, "punchHole: cannot start");
    return NULL;
  }
  if (napi_create_async_work(env, NULL, name, punch_execute, punch_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    napi_delete_reference(env, job->callback);
    free(job);
    napi_throw_error(env, NULL, "punchHole: cannot queue");
    return NULL;
  }
  return NULL;
}

static napi_value read_cached(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  int32_t fd;
  int64_t offset, length, position;
  void *data;
  size_t size;
  if (argc != 5 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &data, &size) != napi_ok ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok ||
      napi_get_value_int64(env, argv[4], &position) != napi_ok ||
      fd < 0 || offset < 0 || length < 0 || position < 0 || (uint64_t)offset + (uint64_t)length > size) {
    napi_throw_type_error(env, NULL, "readCached(fd >= 0, buffer, offset, length, position >= 0) within the buffer");
    return NULL;
  }
  struct iovec iov = { .iov_base = (char *)data + offset, .iov_len = (size_t)length };
  ssize_t n;
  do {
    n = preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  napi_value result;
  if (napi_create_int64(env, n < 0 ? -(int64_t)errno : (int64_t)n, &result) != napi_ok) return NULL;
  return result;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  if (napi_create_function(env, "punchHole", NAPI_AUTO_LENGTH, punch_hole, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "punchHole", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "readCached", NAPI_AUTO_LENGTH, read_cached, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "readCached", fn) != napi_ok) return NULL;
  return exports;
}
