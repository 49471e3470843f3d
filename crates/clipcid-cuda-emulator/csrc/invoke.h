/* A kernel called with its arguments as cudaLaunchKernel takes them: args[i] points at the
   value of parameter i, whose type the kernel's own signature gives. */
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

namespace clipcid_emu {

using Invoker = void (*)(void **);

template <typename... A, std::size_t... I>
void call_with(void (*kernel)(A...), void **args, std::index_sequence<I...>) {
    kernel(*static_cast<std::decay_t<A> *>(args[I])...);
}

template <typename... A> void call(void (*kernel)(A...), void **args) {
    call_with(kernel, args, std::index_sequence_for<A...>{});
}

struct KernelEntry {
    const char *name;
    Invoker invoke;
};

} // namespace clipcid_emu

#define CLIPCID_EMU_ENTRY(name)                                                                \
    clipcid_emu::KernelEntry { #name, [](void **args) { clipcid_emu::call(&name, args); } }
